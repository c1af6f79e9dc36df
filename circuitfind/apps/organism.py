"""`circuitfind organism`: train the model organism (Hydra app, config: configs/organism.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from circuitfind.errors import CircuitfindError
from circuitfind.organism.config import register_organism_config

log = logging.getLogger(__name__)
register_organism_config()


def run_organism(cfg: DictConfig, run_dir: Path, command: str = "circuitfind organism") -> Dict:
    """Train, save into `out_dir` (default <run_dir>/checkpoint), ship if asked; print the accuracies."""
    import torch  # only once Hydra has composed a config: --help and config errors come without it

    from circuitfind.organism.dbm import run_dbm
    from circuitfind.organism.save import save_checkpoint, ship, write_record
    from circuitfind.organism.train import train_organism

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    model, tokenizer, result = train_organism(cfg)
    checkpoint = Path(cfg.out_dir) if cfg.out_dir else Path(run_dir) / "checkpoint"
    save_checkpoint(model, tokenizer, result, command, checkpoint)
    if cfg.dbm_lams:
        result["dbm"] = run_dbm(checkpoint.resolve(), Path(run_dir) / "dbm", cfg.dbm_lams, cfg.iit.position)
    write_record(result, command, checkpoint)
    shipped = ship(checkpoint, cfg.asset) if cfg.ship else None
    log.info("held-out exact match (%.1f min of training):", result["train_seconds"] / 60)
    for op, by_form in result["accuracy"].items():
        log.info("  %-4s %s", op, "  ".join(f"{form} {acc:.1%}" for form, acc in by_form.items()))
    for name, by_op in result["interchange"].items():
        log.info("  interchange %-6s %s", name, "  ".join(f"{op} {acc:.1%}" for op, acc in by_op.items()))
    for position, by_op in result.get("alone", {}).items():
        log.info(
            "  alone at %-7s %s", position, "  ".join(f"{op} {w['kept']:.1%} ({w['unit']})" for op, w in by_op.items())
        )
    for row in result.get("dbm", []):
        log.info("  DBM %s", "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    log.info("checkpoint: %s%s", checkpoint, f" (shipped to {shipped})" if shipped else "")
    return result


@hydra.main(config_path="pkg://circuitfind.configs", config_name="organism", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    command = " ".join(["circuitfind organism", *hc.overrides.task])
    try:
        run_organism(cfg, Path(hc.runtime.output_dir), command)
    except CircuitfindError as e:
        raise SystemExit(f"circuitfind: error: {e}") from None  # one line, exit status 1
