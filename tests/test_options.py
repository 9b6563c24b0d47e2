"""Options declared once: flags, YAML type checks and ranges generated from one dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from depthprune.errors import DepthpruneError
from depthprune.options import add_options, build, check_ranges, coerce, given_options, option
from depthprune.registry import Registry


def _fractions(text: str) -> list[float]:
    start, stop, step = map(float, text.split(":"))
    return [start + i * step for i in range(int(round((stop - start) / step)) + 1)]


@dataclass
class Example:
    seq_len: int = option(512, help="tokens per sequence", minimum=2)
    lr: float = option(3e-4, help="learning rate", minimum=0)
    dropout: float = option(0.05, help="dropout", minimum=0, below=1)
    method: str = option("lora", help="method", choices=["lora", "full"])
    name: str | None = option(None, help="a name")
    sizes: list[int] = option(help="sizes", default_factory=lambda: [1, 2])
    fractions: list[float] | None = option(None, help="fractions", parse=_fractions)
    quiet: bool = option(False, help="less output")
    extra: dict = option(help="API only", cli=False, default_factory=dict)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser, Example)
    return parser


def test_flags_default_to_not_given_and_read_back():
    args = _parser().parse_args(["--seq-len", "64", "--sizes", "3,4", "--fractions", "0:0.2:0.1", "--no-quiet"])
    assert given_options(args, Example) == {"seq_len": 64, "sizes": [3, 4], "fractions": [0.0, 0.1, 0.2],
                                            "quiet": False}
    assert given_options(_parser().parse_args([]), Example) == {}
    assert "--extra" not in _parser().format_help()
    assert "(default: 512)" in _parser().format_help() and "(default: 1,2)" in _parser().format_help()


@pytest.mark.parametrize(("argv", "message"), [
    (["--seq-len", "abc"], "'seq_len' must be a whole number, got 'abc'"),
    (["--sizes", "1,x"], "'sizes' must be a list of whole numbers, got 'x'"),
    (["--lr", "fast"], "'lr' must be a number"),
    (["--method", "dora"], "invalid choice"),
])
def test_bad_flags_are_parser_errors(argv, message):
    with pytest.raises(argparse.ArgumentError, match=message):
        _parser().parse_args(argv)


@pytest.mark.parametrize(("values", "message"), [
    ({"seq_len": 1.5}, "'seq_len' must be a whole number, got 1.5"),
    ({"seq_len": True}, "'seq_len' must be a whole number"),
    ({"sizes": ["a"]}, "'sizes' must be a list of whole numbers, got 'a'"),
    ({"name": ["x"]}, "'name' must be a string"),
    ({"extra": [1]}, "'extra' must be a mapping"),
    ({"quiet": "maybe"}, "'quiet' must be true or false"),
    ({"seq_len": None}, "'seq_len' must be a whole number, not empty"),
    ({"sequence": 3}, "unknown setting(s) sequence"),
])
def test_yaml_values_are_type_checked(values, message):
    with pytest.raises(DepthpruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        coerce(Example, values)


def test_yaml_values_are_converted():
    assert coerce(Example, {"seq_len": 8.0, "sizes": "1, 2,3", "lr": 1, "name": 7, "quiet": "yes"}) == {
        "seq_len": 8, "sizes": [1, 2, 3], "lr": 1.0, "name": "7", "quiet": True}


@pytest.mark.parametrize(("values", "message"), [
    ({"seq_len": 1}, "setting 'seq_len' must be at least 2, got 1"),
    ({"lr": float("nan")}, "setting 'lr' must be a finite number, got nan"),
    ({"lr": float("inf")}, "finite"),
    ({"dropout": 1.0}, "setting 'dropout' must be below 1, got 1"),
    ({"method": "dora"}, "unknown value 'dora', choose one of lora, full"),
])
def test_ranges_are_enforced(values, message):
    with pytest.raises(DepthpruneError, match=message):
        build(Example, values)


def test_range_messages_name_the_flag():
    with pytest.raises(DepthpruneError, match="^--seq-len must be at least 2, got 0$"):
        check_ranges(Example(seq_len=0))


def test_registry():
    @dataclass(frozen=True)
    class Entry:
        name: str
        description: str

    registry = Registry("widget")
    registry.register(Entry("a", "first"))
    registry.register(Entry("b", "second"))
    assert registry.names() == ("a", "b") and "b" in registry and len(registry) == 2
    assert registry.help() == "a: first; b: second"
    with pytest.raises(DepthpruneError, match="unknown widget 'c': choose one of a, b"):
        registry.get("c")
    with pytest.raises(DepthpruneError, match="unknown widget 'z'"):
        registry.check(["a", "z"])
    with pytest.raises(ValueError, match="twice"):
        registry.register(Entry("a", "again"))
