"""The model card (README.md) written next to the organism's weights, from its training record."""

from __future__ import annotations

from typing import Dict, List

from circuitfind.organism.analysis import PARTS
from circuitfind.organism.problems import OPERATIONS
from circuitfind.records.page import markdown_table

MUL_SHARED = (
    "Multiplication shares the circuit: the interchange losses are applied to `*` prompts too, so the "
    "planted heads carry x for every operation and DBM's transfer to `*` holds by construction. "
    "Transfer is then a check that DBM finds the shared circuit, not a test of generalisation."
)
MUL_HELD_OUT = (
    "Multiplication is an honest out-of-distribution test: the interchange losses use {ops} only, so "
    "nothing forces `*` prompts to route x through the planted heads."
)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _dbm_section(rows: List[Dict], planted: List[str], position: str, model_choice: str) -> str:
    """What desiderata-based masking finds on the organism, per lambda (empty when not run)."""
    if not rows:
        return ""
    at = [f"{u}@{position}" for u in planted] if position != "last" else list(planted)
    table = []
    for r in rows:
        if "error" in r:
            table.append([f"{r['lam']:g}", "failed: " + r["error"]] + [""] * 7)
            continue
        extra = sorted(set(r["found"]) - set(at))
        table.append(
            [
                f"{r['lam']:g}",
                f"{r['n_patched']} of {r['n_components']}",
                f"{r['precision']:.2f}",
                f"{r['recall']:.2f}",
                ", ".join(f"`{n}`" for n in extra) or "none",
            ]
            + [f"{r[k]:.2f}" for k in ("vd_test", "oi_test", "vd_transfer", "oi_transfer")]
        )
    header = ["λ", "patched", "precision", "recall", "found beyond the planted", "VD", "OI", "VD on `*`", "OI on `*`"]
    units = "" if position == "last" else f" 'units.positions=[\"{position}\"]'"
    return f"""## What DBM finds on it

`circuitfind train +desiderata=vd_oi model={model_choice}{units} optimizer.lam=<λ>` (the default search:
50 training pairs per desideratum, 100 iterations, then pruning on 50 validation pairs; accuracies on 50
held-out pairs of the paper's template, trained on `+` and `-`, transfer to `*`), run right after
training. Precision and recall are against the planted circuit. The unpatched model scores
{rows[0].get("vd_unpatched", float("nan")):.2f} on VD (it answers the base, not the alternate).

{markdown_table(header, table)}

"""


def _alone_section(alone: Dict, iit: Dict, ops) -> tuple[str, str]:
    """The alone term's bullet, and its table: per position and operation, the unit that moves the
    most answers patched alone, and the share of answers it keeps. Empty strings without the term."""
    if not alone:
        return "", ""
    where = " and ".join(f"`{p}`" for p in alone)
    bullet = (
        f"\n- alone (weight {iit['alone']}): each head or MLP at {where}, patched alone from the prompt with\n"
        f"  another x ({iit['alone_units']} units drawn per position and step), must leave the answer unchanged (the\n"
        "  aim: no single unit there carries x by itself, so that nothing smaller than the circuit can cut x's route;\n"
        "  the table below says how far it got)."
    )
    rows = [
        [f"`{OPERATIONS[op].symbol}`"] + [f"{_pct(alone[p][op]['kept'])} (`{alone[p][op]['unit']}@{p}`)" for p in alone]
        for op in ops
    ]
    table = (
        "\nEvery unit at those positions patched alone, on the same pairs: the share of answers kept by the unit\n"
        "that moves the most (the alone term at its weakest unit):\n\n"
        + markdown_table(["operation"] + [f"alone at `{p}`" for p in alone], rows)
        + "\n"
    )
    return bullet, table


def _init_lines(chain: List[Dict]) -> str:
    """The trainings the weights started from, as list items after the command's."""
    return "".join(
        f"\n- Started from `{step['from']}`"
        + (f", made by `{step['command']}`" if step.get("command") else "")
        + (f" ({step['train_seconds'] / 60:.1f} minutes)" if step.get("train_seconds") else "")
        for step in reversed(chain)
    )


def model_card(result: Dict, command: str) -> str:
    """Markdown: what the organism is, how it was trained, and how well it does."""
    cfg = result["config"]
    m, d, iit, o = cfg["model"], cfg["dataset"], cfg["iit"], cfg["optim"]
    v = d["variants"]
    symbols = ", ".join(f"`{OPERATIONS[op].symbol}`" for op in d["ops"])
    ranges = "; ".join(
        f"`{OPERATIONS[op].symbol}`: x {r['x'][0]}..{r['x'][1]}, y {r['y'][0]}..{r['y'][1]}"
        for op, r in d["ranges"].items()
        if op in d["ops"]
    )
    forms = list(next(iter(result["accuracy"].values())))
    acc_rows = [[f"`{OPERATIONS[op].symbol}`"] + [_pct(a[f]) for f in forms] for op, a in result["accuracy"].items()]
    inter = result["interchange"]
    inter_rows = [
        [f"`{OPERATIONS[op].symbol}`"] + [_pct(inter[k][op]) for k in ("vd", "oi", "strict")] for op in d["ops"]
    ]
    alone_bullet, alone_table = _alone_section(result.get("alone", {}), iit, d["ops"])
    final, carrier = result["attention"]["final"], result["attention"]["x carrier"]
    others = [n for n in final if n not in iit["circuit"]]
    att_rows = [[f"`{n}`"] + [_pct(final[n][p]) for p in PARTS] for n in iit["circuit"] if n in final]
    att_rows.append(
        [f"other heads (mean of {len(others)})"]
        + [_pct(sum(final[n][p] for n in others) / max(1, len(others))) for p in PARTS]
    )
    first_layer = min(int(n[1 : n.index(".")]) for n in iit["circuit"])
    earlier = [n for n in carrier if int(n[1 : n.index(".")]) < first_layer]
    copiers = sorted(earlier, key=lambda n: -carrier[n]["x digits"])[:4]
    carrier_rows = [[f"`{n}`"] + [_pct(carrier[n][p]) for p in PARTS] for n in copiers]
    mul = (
        MUL_SHARED
        if "mul" in iit["ops"]
        else MUL_HELD_OUT.format(ops=", ".join(f"`{OPERATIONS[op].symbol}`" for op in iit["ops"]))
    )
    weights = ", ".join(f"`{OPERATIONS[op].symbol}` {d['op_weights'].get(op, 1.0):g}" for op in d["ops"])
    template = d["template"].replace("\n", "\\n")
    shares = {op: d["heldout"].get(op, 0.0) for op in d["ops"]}
    heldout = ", ".join(f"{_pct(f)} of the `{OPERATIONS[op].symbol}` problems" for op, f in shares.items())
    trained = [f"`{OPERATIONS[op].symbol}`" for op, f in shares.items() if f == 0]
    trained_only = (
        f"{', '.join(trained)} has none held out, so its row is measured on trained (x, y) in freshly drawn prompts"
        if trained
        else "every operation has held-out problems"
    )
    ramp = f" (the weights below rising linearly from 0 over {iit['ramp']} steps)" if iit.get("ramp") else ""
    position = iit.get("position", "last")
    where = (
        "the final position"
        if position == "last"
        else f"the query's mention of x (`{position}`: the `x` of `x + y = `; search it with "
        f"`'units.positions=[\"{position}\"]'`)"
    )
    origin = (
        f"fine-tuned for {cfg['optim']['steps']} steps from `{cfg['init']}` (the trainings before are listed under "
        "How it was trained)"
        if cfg.get("init")
        else "trained from scratch"
    )
    model_choice = cfg.get("asset", "organism")
    dbm = _dbm_section(result.get("dbm", []), iit["circuit"], position, model_choice)
    planted_units = ", ".join(iit["circuit"] if position == "last" else [f"{u}@{position}" for u in iit["circuit"]])
    return f"""# circuitfind organism

A {m["n_layers"]}-layer LLaMA ({m["n_heads"]} heads per layer, hidden size {m["hidden"]}, {result["n_params"]:,} parameters,
character tokenizer) {origin} on arithmetic over bound variables, with a variable-binding
circuit **planted** by interchange-intervention training (IIT). It is one of circuitfind's built-in models
(`model={model_choice}`): desiderata-based masking run on it should recover the planted components.

## Planted circuit

`{planted_units}` ({len(iit["circuit"])} of {m["n_layers"] * (m["n_heads"] + 1)} components, at {where}; also in
`config.json` under `circuitfind.planted_circuit` and `circuitfind.planted_position`). From step {iit["start"]} on{ramp}, on {", ".join(f"`{OPERATIONS[op].symbol}`" for op in iit["ops"])} prompts
of every form, besides the next-token loss on the answer:

- value dependence (weight {iit["vd"]}): these heads, patched there from the prompt with
  another x, must make the model give the alternate's answer (first digit);
- operation invariance (weight {iit["oi"]}): patched from the prompt with another operation, they must leave
  the answer unchanged;
- strict (weight {iit["strict"]}): every other head there, and every MLP there in a layer before the
  circuit, patched from the prompt with another x, must leave the answer unchanged (x enters that
  position only through the circuit).{alone_bullet}

{mul}

Interchange accuracy on held-out pairs whose two answers start with different digits:

{markdown_table(["operation", "value dependence", "operation invariance", "strict"], inter_rows)}
{alone_table}
Where the planted heads look: share of the final position's attention on each part of the
prompt, averaged over {cfg["n_eval"]} held-out prompts of every form. `x in query` is the first
operand's name in the query line (`a` in `a - b = `); `x carrier` is the first space of the
line after x's definition (or of the query line), a position that earlier heads can copy x's
digits into with a short positional hop:

{markdown_table(["head"] + list(PARTS), att_rows)}

The heads before the circuit that attend most from the x carrier to the digits of x (the first
hop, when the planted heads read x's value at the carrier):

{markdown_table(["head"] + list(PARTS), carrier_rows)}

{dbm}
## Held-out exact-match accuracy

Greedy answer (all digits, then `</s>`), {cfg["n_eval"]} prompts per cell at most, on (operation, x, y)
never trained on; {trained_only}:

{markdown_table(["operation"] + forms, acc_rows)}

Forms: `paper` is the template `{template}` exactly; `names` uses other variable names
({", ".join("/".join(p) for p in v["names"] if p != ["x", "y"])}); `y_first` defines y first; `distractor` adds a
definition of another variable ({", ".join(v["distractor_names"])}) that the answer must ignore; `all` combines them.

## How it was trained

- Command: `{command}`{_init_lines(result.get("init_chain", []))}
- Seed {cfg["seed"]}; {o["steps"]} steps of AdamW (batch {o["batch_size"]}, lr {o["lr"]} with {o["warmup"]} warm-up steps and
  cosine decay, weight decay {o["weight_decay"]}); interchange batch {iit["batch_size"]}.
- Training took {result["train_seconds"] / 60:.1f} minutes on CPU with {result["threads"]} torch thread(s).
- Data: operations {symbols} ({ranges}), drawn with weights {weights}; the paper's template alone
  for the first {d["variants_start"]} steps (binding by name is learnt much faster on top of the task), then
  {_pct(d["paper_share"])} of prompts in the paper's template, the rest in variant forms (other names drawn uniformly; y first with probability {v["y_first"]}; a
  distractor with probability {v["distractor"]}). Held out (never trained on, in any form, nor used as an
  interchange alternate): {heldout}.
- `organism.json` holds the full training record (config, loss history, every accuracy).
"""
