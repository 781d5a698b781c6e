"""The task reward: a user's 'module:function' taking (row, completion_text) and
returning a number, loaded and checked before any model loads, and called on every
rollout with a one-line error naming the row when it misbehaves."""

import importlib
import inspect
import math
import numbers

import torch


def load_reward_fn(spec: str):
    """The function named by --reward-fn; its signature must accept (row, completion_text)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise SystemExit(f"error: --reward-fn {spec!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name or module_name.startswith(f"{error.name}."):  # the module itself is missing
            raise SystemExit(f"error: --reward-fn {spec!r}: no module named {module_name!r} on the Python path") from None
        raise SystemExit(f"error: --reward-fn {spec!r}: its module imports {error.name!r}, which is not installed") from None
    except Exception as error:  # a syntax error or an exception raised while the module is imported
        where = f" ({error.filename}, line {error.lineno})" if isinstance(error, SyntaxError) else ""
        raise SystemExit(f"error: --reward-fn {spec!r}: importing {module_name!r} failed with "
                         f"{type(error).__name__}: {error}{where}".splitlines()[0][:300]) from None
    reward_fn = getattr(module, function_name, None)
    if not callable(reward_fn):
        raise SystemExit(f"error: --reward-fn {spec!r}: module {module_name!r} has no function {function_name!r}")
    try:
        inspect.signature(reward_fn).bind({}, "")
    except TypeError:
        raise SystemExit(f"error: --reward-fn {spec!r} must take two arguments (row, completion_text)") from None
    except ValueError:
        pass  # a builtin without a readable signature: its first call tells
    return reward_fn


def required_fields(reward_fn) -> tuple[str, ...]:
    """The row fields a reward function reads besides the prompt, as it declares them in a
    `required_fields` attribute (the toy/IFEval reward needs `instruction_id_list`), so
    training rows without them are refused when they load, not at the first reward."""
    return ("prompt", *getattr(reward_fn, "required_fields", ()))


def reward_scores(reward_fn, rows: list[dict], texts: list[str]) -> torch.Tensor:
    """Rewards as a float32 tensor. Any real number is accepted (numpy scalars too); a
    NaN/inf, a non-number or an exception stops the run with the row named."""
    rewards = []
    for row, text in zip(rows, texts, strict=True):
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
