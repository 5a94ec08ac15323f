"""The README's "Use it in your training loop" snippets run as written (in order, one namespace)."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Use it in your training loop"


def training_loop_blocks():
    text = README.read_text()
    start = text.index(HEADING) + len(HEADING)
    end = text.find("\n## ", start)
    section = text[start:] if end < 0 else text[start:end]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_section_has_the_four_uses():
    blocks = training_loop_blocks()
    assert len(blocks) == 4
    joined = "\n".join(blocks)
    for needle in ("SequentialLR", "GradScaler", "torch.compile", "AutoMrGD"):
        assert needle in joined


@pytest.mark.integration  # compiles a training step with inductor
def test_training_loop_snippets_run():
    torch.set_num_threads(1)
    torch._dynamo.reset()
    namespace: dict = {}
    for block in training_loop_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    # The AutoMrGD loop ran with a scheduler: its multiplier is the scheduler's last value.
    assert namespace["opt"].param_groups[0]["lr"] == pytest.approx(1.0)
    assert all(torch.isfinite(p).all() for p in namespace["model"].parameters())
