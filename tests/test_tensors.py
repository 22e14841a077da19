"""tensors: ScalarLog keeps one number per step compactly; stack_scalars stacks one-value tensors."""

from __future__ import annotations

import pytest
import torch

from learnloop.tensors import ScalarLog, stack_scalars


class TestScalarLog:
    @pytest.mark.parametrize("n", [0, 1, 6, 7, 20])
    def test_values_as_appended(self, n):
        """Values come back in order, across chunk boundaries and moves to the host, as float32 floats."""
        values = torch.randn(n, dtype=torch.float64)
        log = ScalarLog(chunk=3)
        for i, v in enumerate(values):
            log.append(v)
            if i == 4:
                log.to_host()  # as after an epoch
        assert len(log) == n
        assert log.tolist() == values.float().tolist()
        assert all(isinstance(x, float) for x in log.tolist())

    def test_reads_do_not_lose_later_values(self):
        """Reading in the middle of a run, then appending, keeps every value once."""
        log = ScalarLog(chunk=4)
        for x in range(5):
            log.append(torch.tensor(float(x)))
        assert log.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        for x in range(5, 11):
            log.append(torch.tensor(float(x)))
        assert log.tolist() == [float(x) for x in range(11)]

    def test_mixed_dtypes_and_shapes(self):
        """bfloat16, float64 and (1,)-shaped values are recorded as their float32 values."""
        log = ScalarLog(chunk=3)
        for t in (
            torch.tensor(1.5, dtype=torch.bfloat16),
            torch.tensor([2.25]),
            torch.tensor(0.1, dtype=torch.float64),
        ):
            log.append(t)
        assert log.tolist() == [1.5, 2.25, torch.tensor(0.1).item()]

    def test_clear(self):
        """clear() forgets every value, stacked or not."""
        log = ScalarLog(chunk=2)
        for _ in range(5):
            log.append(torch.tensor(1.0))
        log.clear()
        assert len(log) == 0 and log.tolist() == []

    def test_chunk_checked(self):
        """A chunk below 1 is refused with the value."""
        with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
            ScalarLog(chunk=0)

    def test_repr(self):
        """The repr says how many values it holds."""
        log = ScalarLog(chunk=8)
        log.append(torch.tensor(1.0))
        assert repr(log) == "ScalarLog(1 values, chunk=8)"


class TestStackScalars:
    def test_stacks_as_float32(self):
        """One-value tensors of any float dtype become one 1-d float32 tensor."""
        out = stack_scalars(
            [torch.tensor(1.0, dtype=torch.float16), torch.tensor([2.0])]
        )
        assert out.dtype == torch.float32 and out.tolist() == [1.0, 2.0]

    @pytest.mark.parametrize("shapes", [[(3,), (3,)], [(), (2,)]])
    def test_more_than_one_value_refused(self, shapes):
        """A tensor with several values is refused (a per-sample loss, say)."""
        with pytest.raises(ValueError, match="2 of them hold [36] values"):
            stack_scalars([torch.zeros(s) for s in shapes])
