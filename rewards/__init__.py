"""Reward functions, the plugin loader and their weighted sum.

Every reward is called as `reward(prompts, completions, **columns) -> list[float]`; see
rewards.registry for the contract. No Ray here: a Ray reward actor wraps `WeightedReward`.
"""
from rewards.combine import PRESETS, RewardSpec, WeightedReward, check_reward_config, preset
from rewards.countdown import CountdownReward, countdown_score, evaluate_equation
from rewards.exact import ExactReward, exact_score
from rewards.format import FormatReward, format_score
from rewards.math_reward import MathReward, extract_answer, normalize_answer, sanitize_answer, verify_answer
from rewards.registry import (
    Reward,
    RewardResult,
    RewardValueError,
    available_rewards,
    build_reward,
    check_reward,
    component_key,
    load_reward,
    register_reward,
)
from rewards.sandbox import JobResult, SubprocessPool
from rewards.sudoku import SudokuReward, extract_grid, sudoku_score

__all__ = [
    "PRESETS", "RewardSpec", "WeightedReward", "check_reward_config", "preset",
    "CountdownReward", "countdown_score", "evaluate_equation",
    "ExactReward", "exact_score",
    "FormatReward", "format_score",
    "MathReward", "extract_answer", "normalize_answer", "sanitize_answer", "verify_answer",
    "Reward", "RewardResult", "RewardValueError", "available_rewards", "build_reward", "check_reward", "component_key",
    "load_reward", "register_reward",
    "JobResult", "SubprocessPool",
    "SudokuReward", "extract_grid", "sudoku_score",
]
