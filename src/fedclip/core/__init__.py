"""The shared core of every runtime: framework-free, no round loop of its own.

* ``client``: what a client does (train locally, evaluate, personalize) and the values that
  cross the algorithm contract (``RoundConfig``, ``ClientJob``, ``ClientUpdate``);
* ``together``: many clients' local rounds at once, with the same module and optimizer;
* ``state``: a federation between rounds (``FederationState``, the one best-round rule);
* ``records``: typed round records and run results, and their JSON schema;
* ``checkpoint``, ``adapter_file``: the two tensor file formats;
* ``run_folder``: the one owner of a run folder (lock, resume, checkpoints, final writes).

The in-process runner (``fedclip.inprocess``) and the Flower apps (``fedclip.flower``) stand on
it; it imports neither.
"""
