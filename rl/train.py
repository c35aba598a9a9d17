"""python -m rl.train [recipe=NAME] [group=option] [key=value ...]

Hydra composes conf/ (model, task, rollout, reward, algorithm, trainer, ray, logger) with the named
experiment recipes/recipe/NAME.yaml (default: tiny), checks it (rl/config.py), and hands it to the
driver. The run directory is hydra.run.dir; the working directory is left unchanged.
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rl.config import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
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
