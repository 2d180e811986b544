"""The TensorRT runner's stream order (engines/trt_engine.py): TensorRT enqueues on the runner's own stream only
after the inputs' copies on the producing stream. TensorRT itself is not needed: on CPU the order of the two
calls is checked; on a GPU host the same function orders a real copy and a real kernel on two CUDA streams."""

import pytest
import torch

from engines.trt_engine import enqueue_after


class RecordingStream:
    def __init__(self, log: list, name: str):
        self.log, self.name, self.cuda_stream = log, name, 1234

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


def test_enqueue_waits_for_the_producing_stream_first():
    log = []
    trt_stream, producer = RecordingStream(log, "trt"), RecordingStream(log, "default")

    def execute(handle):
        log.append(("execute", handle))
        return True

    assert enqueue_after(trt_stream, producer, execute) is True
    assert log == [("wait", "trt", "default"), ("execute", 1234)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_kernel_on_the_engine_stream_sees_the_inputs_copied_before_it():
    source = torch.arange(1 << 20, dtype=torch.float32).pin_memory()
    buffer = torch.zeros(1 << 20, device="cuda")
    result = torch.empty_like(buffer)
    engine_stream = torch.cuda.Stream()
    torch.cuda._sleep(50_000_000)  # the producing stream is busy: an unordered reader would run first
    buffer.copy_(source, non_blocking=True)

    def execute(handle):
        with torch.cuda.stream(torch.cuda.ExternalStream(handle)):
            result.copy_(buffer * 2)
        return True

    enqueue_after(engine_stream, torch.cuda.current_stream(), execute)
    engine_stream.synchronize()
    assert torch.equal(result.cpu(), source * 2)
