"""Loggers: round callbacks (:mod:`fedclip.callbacks`) that write to an experiment tracker."""
