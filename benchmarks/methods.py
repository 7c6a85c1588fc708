"""The methods after FedCLIP beside it, on the same splits, in two task shapes.

    python benchmarks/methods.py [--data-root ../shared/data/PACS] [--quick] [--only NAME,...]

Runs ``fedclip compare`` commands (each resumable: an interrupted table continues where it
stopped) and writes their tables into ``docs/pacs_compare_algorithms.md`` between the
``<!-- methods:... -->`` markers (the rest of that document is left as it is):

1. **leave-one-domain-out** on full PACS, 3 seeds, 15 rounds at lr 5e-4 (the setting of the
   table above it in that document): generalization to the unseen domain and personalization;
2. **many clients of one domain mix**: sketch held out, the three other domains split into 13
   Dirichlet(0.1) clients each (39 clients with skewed labels), 10 sampled per round, 3 seeds,
   15 rounds: where personalised methods should separate from global ones;
3. **prompts**: the prompt learners (global prompt, personal prompt, generator, mixture of
   experts) beside FedCLIP under the **base-to-novel** protocol (clients train on 4 of PACS's 7
   classes, are tested on the other 3 too), sketch held out, 3 seeds, 10 rounds at lr 2e-3
   (CoOp's learning rate; 10 rounds because these methods run the text tower at every step).

4. **dp**: one method per family under client-level central DP (``dp=server``, epsilon 8 at
   delta 1e-5 over the run), beside the same methods without DP: sketch held out, the three
   other domains split into 13 clients each (39, all training every round: with 3 clients the
   noise on the mean, z C / 3, drowns every method), 10 rounds at lr 2e-3, 3 seeds. Each
   method has its own clipping norm C (``DP``: about the median norm of one client's update
   in the method's first round without DP, measured once on this setting; a deployment
   would choose it without looking at the clients' updates, e.g. from public data).

5. **encoders**: the methods that train through an encoder (federated LoRA: FedIT, FFA-LoRA,
   FLoRA) on the stand-in's text tower (``target=text``: MiniLM's query and value
   projections; the image features stay cached, which is what makes this runnable on 2 cores)
   beside FedCLIP and PromptFL, sketch held out, 3 seeds, 10 rounds at lr 2e-3. The ``dp``
   comparison also runs FFA-LoRA and FedIT under DP (their own no-DP group, ``off-lora``), and
   TRIP (``off-trip``, one seed: about 18 minutes a run with 2 cores, the slowest family).

``--only prompts`` runs (and rewrites) only the comparisons named; ``--only dp:fedit`` one run
of a comparison (its table is rewritten from every run's folder; a row whose runs are not on
this machine is kept as the document has it, and the section says which). ``--write-only``
runs nothing and rewrites the tables from the finished folders.

The commands are printed into the document beside their tables; no number is typed by hand.
``--quick``: the embedded sample, 2 rounds, one seed, into ``benchmarks/results/methods-quick.md``
(a smoke run of this script; ignored by git).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "pacs_compare_algorithms.md"
QUICK = HERE / "results" / "methods-quick.md"
NEW = "prototypes,fedpft,personal-transform"
# one per family: global prompt, global + local prompt, personal low-rank, generator,
# transport-aligned global + local prompt, mixture of experts (TRIP and its 1K-value variant)
PROMPTS = "promptfl,promptfolio,fedpgp,fedtpg,fedotp,trip,trip-lite"
# dp: method -> (family, clipping norm C)
# (the medians measured: fedclip 2.59, promptfl 0.192, fedpgp 0.318, fedtpg 7.33, trip 0.265)
DP = {"fedclip": ("adapter", 2.5), "promptfl": ("global prompt", 0.2),
      "fedpgp": ("personal low-rank", 0.3), "fedtpg": ("generator", 7.0)}
# TRIP (mixture of experts) in its own no-DP group (``off-trip``), one seed: its instance
# prompts put every image's C class prompts through the text tower, in training and in every
# round's scoring of the clients' splits and the held-out domain (about 100 s a round on
# this setting with 2 cores, 18 minutes a run); its runs are added to the table without
# re-running the others
DP_TRIP = {"trip": ("mixture of experts", 0.27)}
TRIP_SEEDS = "0"
# LoRA under the same DP, in its own no-DP group (method -> (family, C)): FFA-LoRA's frozen A
# is what its paper says makes DP cheap; FedIT noises A and B alike
# (target=text; the medians measured: ffa-lora 0.869, fedit 1.334)
DP_LORA = {"ffa-lora": ("LoRA, A frozen", 0.87), "fedit": ("LoRA, A and B", 1.33)}
DP_EPSILON = "8"
# the methods that train through an encoder, run on the stand-in's text tower (MiniLM; the
# image features stay cached): LoRA on its query and value projections
LORA = ("fedit", "ffa-lora", "flora")
LORA_TEXT = [a for name in LORA for a in ("--set", f"{name}.target=text")]
COMMON = ["--backbone", "standin", "--set", "lr=5e-4", "--set", "personalize_epochs=2"]


def commands(data_root: str, quick: bool) -> dict[str, list[str]]:
    """The two comparisons, as ``fedclip`` argument lists."""
    data = [] if quick else ["--data-root", data_root]
    seeds, rounds = ("0", "2") if quick else ("0,1,2", "15")
    runs = Path("runs")
    lodo = ["compare", *data, *COMMON, "--algorithms", f"zeroshot,fedclip,linear-probe,{NEW}",
            "--seeds", seeds, "--rounds", rounds, "--out",
            str(runs / ("methods-quick-lodo" if quick else "compare-pacs-new"))]
    per_domain = "2" if quick else "13"
    dirichlet = ["compare", *data, *COMMON, "--heldout", "sketch",
                 "--algorithms", f"zeroshot,fedclip,linear-probe,ditto,{NEW}",
                 "--set", "partition=dirichlet", "--set", "dirichlet_alpha=0.1",
                 "--set", f"clients_per_domain={per_domain}", "--set", "clients_per_round=10",
                 "--seeds", seeds, "--rounds", rounds, "--out",
                 str(runs / ("methods-quick-dirichlet" if quick else "compare-pacs-dirichlet"))]
    prompts = ["compare", *data, "--backbone", "standin", "--set", "lr=2e-3",
               "--set", "personalize_epochs=2", "--heldout", "sketch",
               "--set", "protocol=base2novel", "--algorithms", f"zeroshot,fedclip,{PROMPTS}",
               "--seeds", seeds, "--rounds", "2" if quick else "10", "--out",
               str(runs / ("methods-quick-prompts" if quick else "compare-pacs-prompts"))]
    dp_setting = [*data, "--backbone", "standin", "--set", "lr=2e-3",
                  "--set", "personalize_epochs=0", "--heldout", "sketch",
                  "--set", f"clients_per_domain={per_domain}", "--seeds", seeds,
                  "--rounds", "2" if quick else "10"]
    dp_out = runs / ("methods-quick-dp" if quick else "compare-pacs-dp")
    dp = {"dp:off": ["compare", *dp_setting, "--algorithms", ",".join(["zeroshot", *DP]),
                     "--out", str(dp_out / "off")]}
    for name, (_, clip) in DP.items():
        dp[f"dp:{name}"] = ["compare", *dp_setting, "--algorithms", name,
                            "--set", "dp=server", "--set", "aggregation=uniform",
                            "--set", f"dp_epsilon={DP_EPSILON}", "--set",
                            f"dp_clipping_norm={clip}", "--out", str(dp_out / name)]
    one_seed = list(dp_setting)
    one_seed[one_seed.index("--seeds") + 1] = TRIP_SEEDS
    for group, setting, methods, extra in (("off-lora", dp_setting, DP_LORA, LORA_TEXT),
                                           ("off-trip", one_seed, DP_TRIP, [])):
        dp[f"dp:{group}"] = ["compare", *setting, *extra, "--algorithms", ",".join(methods),
                             "--out", str(dp_out / group)]
        for name, (_, clip) in methods.items():
            dp[f"dp:{name}"] = ["compare", *setting, *extra, "--algorithms", name,
                                "--set", "dp=server", "--set", "aggregation=uniform",
                                "--set", f"dp_epsilon={DP_EPSILON}", "--set",
                                f"dp_clipping_norm={clip}", "--out", str(dp_out / name)]
    encoders = ["compare", *data, "--backbone", "standin", "--set", "lr=2e-3",
                "--set", "personalize_epochs=2", "--heldout", "sketch", *LORA_TEXT,
                "--algorithms", f"zeroshot,fedclip,promptfl,{','.join(LORA)}",
                "--seeds", seeds, "--rounds", "2" if quick else "10", "--out",
                str(runs / ("methods-quick-encoders" if quick else "compare-pacs-encoders"))]
    return {"lodo": lodo, "dirichlet": dirichlet, "prompts": prompts, "encoders": encoders,
            **dp}


def section(name: str, argv: list[str], plots: Path | None = None) -> str:
    """The generated text of one comparison: its command, its compare.md tables and (with
    ``plots``, a folder) its compare.png copied there and linked."""
    out = Path(argv[argv.index("--out") + 1])
    figure = ""
    if plots is not None and (out / "compare.png").exists():
        shutil.copyfile(out / "compare.png", plots / f"pacs_methods_{name}.png")
        figure = f"\n\n![held-out accuracy per round, {name}](pacs_methods_{name}.png)"
    tables = (out / "compare.md").read_text()
    tables = re.sub(r"^# .*\n", "", tables)  # the document has its own headings
    tables = re.sub(r"^## ", "#### ", tables, flags=re.MULTILINE)
    if errors := lora_errors(out):
        tables = (tables.rstrip() + "\n\n#### aggregation error (every round's record, "
                  "every seed)\n\n" + errors)
    command = "fedclip " + " ".join(shlex.quote(a) for a in argv)
    return (f"<!-- methods:{name} begin (generated by benchmarks/methods.py) -->\n"
            f"```bash\n{command}\n```\n\n{tables.strip()}{figure}\n"
            f"<!-- methods:{name} end -->")


def lora_errors(out: Path) -> str:
    """The aggregation error of each LoRA method in a comparison's folder, from its round
    records: the distance between the aggregated update and the mean of the clients' own
    B·A, absolute and relative to that mean's norm (median and range over seeds and rounds)."""
    import json
    import statistics

    rows = ["| method | aggregation error, median (range) | relative to the mean update, "
            "median (range) |", "|---|---|---|"]
    for name in LORA:
        pairs = [(m["aggregation_error"], m["mean_update_norm"])
                 for f in sorted(out.glob(f"{name}-seed*/results.json"))
                 for r in json.loads(f.read_text())["runs"][0]["history"]
                 if (m := r.get("metrics") or {}).get("aggregation_error") is not None]
        if not pairs:
            continue
        err = [e for e, _ in pairs]
        rel = [e / n for e, n in pairs if n > 0]
        rows.append(f"| {name} | {statistics.median(err):.3g} ({min(err):.3g} to {max(err):.3g}) "
                    f"| {statistics.median(rel):.3g} ({min(rel):.3g} to {max(rel):.3g}) |")
    return "\n".join(rows) if len(rows) > 2 else ""


def _cell(out: Path, table: str, column: str) -> str:
    """The 'average' row's cell of ``column`` in a comparison's ``table``."""
    import json

    data = json.loads((out / "compare.json").read_text())["tables"][table]
    row = next(r for r in data["rows"] if r[0] == "average")
    return row[data["header"].index(column)]


def _selected_rounds(out: Path, name: str) -> str:
    """The round each seed's run selected (best validation accuracy), e.g. '0,0,3'."""
    import json

    runs = sorted(out.glob(f"{name}-seed*/results.json"))
    return ",".join(str(json.loads(r.read_text())["runs"][0]["best_round"]) for r in runs)


def _done(out: Path, name: str) -> bool:
    """Whether a comparison folder holds ``name``'s finished runs."""
    import json

    if not (out / "compare.json").exists():
        return False
    header = json.loads((out / "compare.json").read_text())["tables"]["generalization"]["header"]
    return name in header


def dp_section(argvs: dict[str, list[str]], previous: str = "") -> str:
    """One row per family: the method without DP and with it (its C, noise multiplier and
    the epsilon the run spent, read from its results), and the round each seed selected.

    A row whose two run folders are not on this machine is kept as ``previous`` (the
    document's last write of this section) has it, and the section names it: the DP runs
    take hours in all, so a family is added without re-running the others. A row found in
    neither is refused, naming the commands to run."""
    import json

    out = {k: Path(v[v.index("--out") + 1]) for k, v in argvs.items()}
    kept_rows = {m.group(1): m.group(0) for m in
                 re.finditer(r"^\| ([\w-]+) \|.*\|$", previous, flags=re.MULTILINE)}
    rows = ["| method | family | C | z | epsilon spent | held-out, no DP | held-out, DP "
            "| clients, no DP | clients, DP | selected rounds, no DP / DP |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    kept, missing = [], []
    groups = [("dp:off", DP), ("dp:off-lora", DP_LORA), ("dp:off-trip", DP_TRIP)]
    for group, methods in groups:
        for name, (family, clip) in methods.items():
            off, on = out[group], out[f"dp:{name}"]
            here = {group: _done(off, name), f"dp:{name}": _done(on, name)}
            if all(here.values()):
                pass
            elif not any(here.values()) and name in kept_rows:
                cells = [c.strip() for c in kept_rows[name].strip("|").split("|")]
                if cells[2] != f"{clip:g}":
                    raise SystemExit(f"the DP table's {name} row has C {cells[2]}, its command "
                                     f"now {clip:g}: run it again (python benchmarks/methods.py"
                                     f" --only {group},dp:{name})")
                rows.append(kept_rows[name])
                kept.append(name)
                continue
            else:  # half of a row on this machine, or none and nothing to keep
                missing.extend(k for k, done in here.items() if not done)
                continue
            run = json.loads((on / f"{name}-seed0" / "results.json").read_text())
            last = run["runs"][0]
            z = last.get("privacy", {}).get("noise_multiplier", float("nan"))
            eps = max(r.get("epsilon") or 0.0 for r in last["history"])
            argv = argvs[f"dp:{name}"]
            if len(seeds := argv[argv.index("--seeds") + 1].split(",")) == 1:
                family += f" (seed {seeds[0]} only)"
            rows.append(f"| {name} | {family} | {clip:g} | {z:.3g} | {eps:.2f} "
                        f"| {_cell(off, 'generalization', name)} "
                        f"| {_cell(on, 'generalization', name)} "
                        f"| {_cell(off, 'personalization', name)} "
                        f"| {_cell(on, 'personalization', name)} "
                        f"| {_selected_rounds(off, name)} / {_selected_rounds(on, name)} |")
    if missing:
        need = ",".join(dict.fromkeys(missing))
        raise SystemExit(f"the DP table needs these runs, which are not finished here and "
                         f"whose rows it cannot keep: {need} (run them: python "
                         f"benchmarks/methods.py --only {need})")
    if _done(out["dp:off"], "zeroshot"):
        zeroshot = (f"Zero-shot: held-out {_cell(out['dp:off'], 'generalization', 'zeroshot')}"
                    f", clients {_cell(out['dp:off'], 'personalization', 'zeroshot')}.")
    elif found := re.search(r"(Zero-shot: held-out .*?, clients .*?\.) Each run", previous):
        zeroshot = found.group(1)
    else:
        raise SystemExit("the DP table needs the zero-shot row of dp:off (run it: python "
                         "benchmarks/methods.py --only dp:off)")
    commands = "\n".join("fedclip " + " ".join(shlex.quote(a) for a in v)
                         for v in argvs.values())
    carried = (f" The rows of {', '.join(kept)} are kept from this table's previous write "
               "(their runs, the commands above, were not on the machine that added the "
               "others).") if kept else ""
    return ("<!-- methods:dp begin (generated by benchmarks/methods.py) -->\n"
            f"```bash\n{commands}\n```\n\nAccuracy % (mean ± std over seeds; held-out: "
            "sketch; clients: the global model on the 39 clients' own test splits, no "
            f"personalization step). {zeroshot} Each run reports the round with the best mean "
            f"validation accuracy; a method whose selected round is 0 reports its untrained "
            f"start.{carried}\n\n" + "\n".join(rows) +
            "\n<!-- methods:dp end -->")


def splice(doc: str, name: str, text: str) -> str:
    """``doc`` with the generated section ``name`` replaced (or appended)."""
    pattern = re.compile(rf"<!-- methods:{name} begin.*?<!-- methods:{name} end -->", re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: text, doc)
    return doc.rstrip() + "\n\n" + text + "\n"


def main() -> None:
    """Run both comparisons and write their tables."""
    from fedclip.cli import main as fedclip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data/PACS")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated comparisons to run")
    parser.add_argument("--write-only", action="store_true",
                        help="write the doc's sections from the finished run folders, run nothing")
    args = parser.parse_args()
    argvs = commands(args.data_root, args.quick)
    if args.only:  # a comparison ("dp") or one of its runs ("dp:fedit")
        only = set(args.only.split(","))
        names = {k.split(":")[0] for k in argvs} | set(argvs)
        if only - names:
            raise SystemExit(f"--only: unknown {sorted(only - names)}; one of {sorted(names)}")
        argvs = {k: v for k, v in argvs.items() if k in only or k.split(":")[0] in only}
    for argv in [] if args.write_only else argvs.values():
        out = Path(argv[argv.index("--out") + 1])
        resume = ["--resume"] if (out / "compare.json").exists() or any(out.glob("*-seed*")) \
            else []
        code = fedclip([*argv, *resume])
        if code:
            raise SystemExit(f"fedclip {' '.join(argv)} failed with exit code {code}")
    target = QUICK if args.quick else DOC
    doc = target.read_text() if target.exists() else "# methods (quick)\n"
    for name, argv in argvs.items():
        if not name.startswith("dp:"):
            doc = splice(doc, name, section(name, argv, None if args.quick else DOC.parent))
    if any(k.startswith("dp:") for k in argvs):  # the table needs every DP run
        dp = {k: v for k, v in commands(args.data_root, args.quick).items()
              if k.startswith("dp:")}
        previous = re.search(r"<!-- methods:dp begin.*?<!-- methods:dp end -->", doc, re.S)
        doc = splice(doc, "dp", dp_section(dp, previous.group(0) if previous else ""))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(doc)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
