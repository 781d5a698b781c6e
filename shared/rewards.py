"""The user's functions: the task reward ('module:function' taking (row,
completion_text) and returning a number) and the evaluation score ((rows, texts) ->
{name: value}), loaded and checked before any model loads; the reward is called on
every rollout with a one-line error naming the row when it misbehaves."""

import importlib
import inspect
import math
import numbers

import torch

from shared.ifeval import without_think


def _import_function(spec: str, flag: str):
    """The function a 'module:function' flag names, or one error line saying why not."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise SystemExit(f"error: {flag} {spec!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name or module_name.startswith(f"{error.name}."):  # the module itself is missing
            raise SystemExit(f"error: {flag} {spec!r}: no module named {module_name!r} on the Python path") from None
        raise SystemExit(f"error: {flag} {spec!r}: its module imports {error.name!r}, which is not installed") from None
    except Exception as error:  # a syntax error or an exception raised while the module is imported
        where = f" ({error.filename}, line {error.lineno})" if isinstance(error, SyntaxError) else ""
        raise SystemExit(f"error: {flag} {spec!r}: importing {module_name!r} failed with "
                         f"{type(error).__name__}: {error}{where}".splitlines()[0][:300]) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SystemExit(f"error: {flag} {spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


def _check_arguments(function, spec: str, flag: str, example: tuple, described: str) -> None:
    try:
        inspect.signature(function).bind(*example)
    except TypeError:
        raise SystemExit(f"error: {flag} {spec!r} must take {described}") from None
    except ValueError:
        pass  # a builtin without a readable signature: its first call tells


def load_reward_fn(spec: str):
    """The function named by --reward-fn; its signature must accept (row, completion_text)."""
    reward_fn = _import_function(spec, "--reward-fn")
    _check_arguments(reward_fn, spec, "--reward-fn", ({}, ""), "two arguments (row, completion_text)")
    return reward_fn


def load_eval_fn(spec: str):
    """The function named by --eval-fn: (rows, texts) -> {name: value}, 'gold' and
    'reward' among the names (the loop prints and records them)."""
    eval_fn = _import_function(spec, "--eval-fn")
    _check_arguments(eval_fn, spec, "--eval-fn", ([], []), "two arguments (rows, texts)")
    return eval_fn


def required_fields(reward_fn) -> tuple[str, ...]:
    """The row fields a reward function reads besides the prompt, as it declares them in a
    `required_fields` attribute (the toy/IFEval reward needs `instruction_id_list`), so
    training rows without them are refused when they load, not at the first reward."""
    return ("prompt", *getattr(reward_fn, "required_fields", ()))


def reward_scores(reward_fn, rows: list[dict], texts: list[str], strip_think: bool = False) -> torch.Tensor:
    """Rewards as a float32 tensor. Any real number is accepted (numpy scalars too); a
    NaN/inf, a non-number or an exception stops the run with the row named.
    strip_think: the function sees a reasoning model's answer, after its </think>
    (shared/ifeval.py:without_think; --strip-think)."""
    rewards = []
    for row, text in zip(rows, [without_think(t) for t in texts] if strip_think else texts, strict=True):
        try:
            value = reward_fn(row, text)
        except Exception as error:
            raise SystemExit(f"error: the reward function raised {type(error).__name__}: {error} "
                             f"for prompt {row['prompt']!r}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise SystemExit(f"error: the reward function returned {value!r} for prompt {row['prompt']!r}; "
                             "rewards must be finite numbers")
        if abs(value) > torch.finfo(torch.float32).max:
            raise SystemExit(f"error: the reward function returned {value!r} for prompt {row['prompt']!r}, which "
                             "overflows float32 (|r| > 3.4e38); rewards must be finite float32 numbers")
        rewards.append(float(value))
    return torch.tensor(rewards)
