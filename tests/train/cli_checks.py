"""A check the train CLI tests share: a command failed with exactly one error line."""

from __future__ import annotations


def one_error(result, *fragments: str) -> str:
    """Exit code 1, one ``loratool: error:`` line, holding every fragment; returns the line."""
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("loratool: error:")]
    assert len(lines) == 1, result.output
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]
