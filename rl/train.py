"""python -m rl.train [recipe=NAME] [group=option] [key=value ...]

Hydra composes conf/ (model, task, rollout, reward, algorithm, trainer, ray, logger) with the named
experiment recipes/recipe/NAME.yaml (default: tiny), checks it (rl/config.py), and hands it to the
driver. The run directory is hydra.run.dir; the working directory is left unchanged. Hydra's job
logging writes the run's log records, the per-step lines included, to <run dir>/train.log.
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rl.config import ConfigError
from rl.tracking import STEP_LOGGER, quiet_libraries


def _step_lines_to_files_only() -> None:
    """Hydra's job logging sends the root logger to the console and to <run dir>/train.log. The Tracker's
    per-step lines already reach the console through tqdm.write (above the progress bar), so keep their
    log records for the files only; a second, timestamped copy on the console would be noise."""
    def not_a_step_line(record: logging.LogRecord) -> bool:
        return record.name != STEP_LOGGER

    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(not_a_step_line)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    _step_lines_to_files_only()
    # Before the driver imports DeepSpeed and starts Ray: local Ray workers inherit this environment.
    quiet_libraries(str(cfg.trainer.device))
    from rl.driver import Driver  # after Hydra has parsed the command line, so --help stays fast

    try:
        driver = Driver(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        logging.getLogger("dllm_rl").error("%s", e)
        sys.exit(2)
    try:
        driver.fit()
    finally:
        driver.close()


if __name__ == "__main__":
    main()
