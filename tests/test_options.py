"""Options defined once (hybrid_gpt.options): a field's spec parses and checks a flag, and holds library
callers of the same dataclass to the same ranges, naming the field."""

import argparse
import math
from dataclasses import dataclass

import pytest

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.chat import Sampling
from hybrid_gpt.options import MAX_MESSAGE_CHARS, add_options, check_fields, one_line, option, shown, values
from hybrid_gpt.train.loop import TrainConfig


@dataclass
class Demo:
    count: int = option(3, lo=1, hi=10, help="how many")
    ratio: float = option(0.5, lo=0, hi=1, hi_open=True)
    name: str | None = option(None, help="a name")
    seeds: list[int] | None = option(None, kind="seeds", unique=True)
    talk: bool = option(True, flags=("--quiet",), help="say what it does")


def _parser(**kw):
    p = argparse.ArgumentParser(exit_on_error=False)
    add_options(p, Demo, **kw)
    return p


def test_flags_defaults_and_help_come_from_the_fields():
    p = _parser()
    args = p.parse_args([])
    assert values(args, Demo) == {"count": 3, "ratio": 0.5, "name": None, "seeds": None, "talk": True}
    args = p.parse_args(["--count", "7", "--ratio", "0", "--name", "x", "--seeds", "1,2", "--quiet"])
    assert values(args, Demo) == {"count": 7, "ratio": 0.0, "name": "x", "seeds": [1, 2], "talk": False}
    assert "how many (default: 3)" in " ".join(p.format_help().split())
    overrides = _parser(overrides=True).parse_args([])  # unset flags leave the value to the library
    assert values(overrides, Demo, skip_none=True) == {}


@pytest.mark.parametrize("argv, problem", [
    (["--count", "0"], "must be at least 1, got '0'"),
    (["--count", "11"], "must be at most 10, got '11'"),
    (["--count", "2.5"], "expected a whole number"),
    (["--ratio", "1"], "must be in [0, 1)"),
    (["--ratio", "nan"], "must be a finite number"),
    (["--name", ""], "must not be empty"),
    (["--name", "\udcff"], "is not valid UTF-8 text"),
    (["--seeds", "4,4"], "repeats a seed"),
    (["--seeds", "-1"], "has -1, which must be in [0, 4294967295]"),
])
def test_each_class_of_bad_value_is_named(argv, problem):
    with pytest.raises(argparse.ArgumentError, match=None) as e:
        _parser().parse_args(argv)
    assert problem in str(e.value)


def test_library_callers_get_the_same_checks_naming_the_field():
    check_fields(Demo())
    with pytest.raises(HybridGPTError, match=r"^ratio must be a finite number, got inf$"):
        check_fields(Demo(ratio=math.inf))
    with pytest.raises(HybridGPTError, match=r"^count must be a whole number"):
        check_fields(Demo(count=True))


@pytest.mark.parametrize("field, value, problem", [
    ("weight_decay", math.nan, "weight_decay must be a finite number"),
    ("weight_decay", math.inf, "weight_decay must be a finite number"),
    ("grad_clip", math.nan, "grad_clip must be a finite number"),
    ("lr", math.inf, "lr must be a finite number"),
    ("lr", 0.0, "lr must be a positive number"),
    ("min_lr_ratio", 1.5, "min_lr_ratio must be in [0, 1]"),
    ("grad_accum", 10**12, "grad_accum must be at most"),
    ("seed", -1, "seed must be in [0, 4294967295]"),
    ("seed", 2**64, "seed must be in [0, 4294967295]"),
    ("max_steps", 0, "max_steps must be at least 1"),
])
def test_train_config_rejects_non_finite_and_out_of_range_values_by_name(field, value, problem):
    with pytest.raises(HybridGPTError) as e:
        TrainConfig(**{field: value}).validate()
    assert str(e.value).startswith(problem) and "--" not in str(e.value)  # the library names no CLI flag


def test_train_config_bounds_what_a_step_allocates_and_decays():
    TrainConfig().validate()
    with pytest.raises(HybridGPTError, match="rows per step; the limit is"):
        TrainConfig(batch_size=2**16, grad_accum=2**16).validate()
    with pytest.raises(HybridGPTError, match=r"weight_decay 1e\+300 x lr 0.003 must be below 1"):
        TrainConfig(weight_decay=1e300).validate()


def test_sampling_settings_are_checked_where_they_are_used():
    Sampling(temperature=0).validate()
    for bad, problem in [({"temperature": math.nan}, "temperature must be a finite number"),
                         ({"temperature": 1e-30}, "must be 0 (greedy) or at least"),
                         ({"top_p": 0.0}, "top_p must be in (0, 1]"), ({"max_new_tokens": 0}, "at least 1")]:
        with pytest.raises(HybridGPTError, match=None) as e:
            Sampling(**bad).validate()
        assert problem in str(e.value)


def test_messages_echo_input_cut_short_on_one_line():
    assert shown("x" * 10) == "'xxxxxxxxxx'"
    assert shown("y" * 10**6).endswith("... (1,000,000 characters)") and len(shown("y" * 10**6)) < 120
    assert shown(10**100).endswith("(101 digits)")
    line = one_line("bad value:\n" + "z" * 10**6 + "\r\nand more " + "w " * 10**5 + "\udcff")
    assert "\n" not in line and "\r" not in line and len(line) <= MAX_MESSAGE_CHARS
    assert one_line("lone \udcff") == "lone \\udcff"  # printable on any stream
