"""Peak training memory of one configuration: predicted before it trains, and measured.

Three functions, one quantity: the bytes of tensor storage alive at the worst moment of a training step
in steady state (weights, trainable parameters, gradients, optimizer state, activations, temporaries).

- `estimate(...)`: analytic, instant. Weights and optimizer state are exact sums over the parameters;
  activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models"): per layer, 16-bit, s·b·h·(34 + 5·a·s/h) bytes, doubled for fp32; with gradient checkpointing
  only each layer's input is kept, plus one layer's activations while it is recomputed. With a frozen base,
  backward still needs every layer's activations to carry the gradient down to the lowest adapter, so the
  formula applies to PEFT as to full fine-tuning. Added: a causal LM's vocabulary logits, and under
  16-bit autocast the 16-bit weight copies backward keeps. It knows nothing of attention kernels or of
  each method's own activations, so it is a first guess.
- `estimate_traced(...)`: runs the real training step (the loop of `autopeft.train.fit`: its optimizer,
  autocast, loss scaling, gradient clipping, checkpointing) on a model built under torch's
  `FakeTensorMode`: tensors carry shapes, dtypes and storages but no data, so a 7B model costs no memory
  and seconds of CPU. `LiveBytes` counts the storages alive after every operation and keeps the peak,
  with what was alive at that moment sorted into weights, trainable parameters, gradients, optimizer
  state, the adapter's own activations ("extras") and the remaining activations.
- `measure(...)`: the same steps for real (`fit` itself, two optimizer steps, on synthetic full-length
  batches): on CUDA `torch.cuda.max_memory_allocated`, on the CPU the peak of the same `LiveBytes`
  tracker, so estimate and measurement count the same thing.

Design decisions:
- Steady state: the first step allocates the optimizer state only at its end; every later step carries
  it through forward and backward. The measurement runs two steps and reports the peak over both; the
  trace makes the state up front (an optimizer step on zero gradients) and then traces one step, which
  costs half the time. With gradient accumulation, two micro-batches (the second runs with gradients
  already held) stand for any number.
- The batch: full length, `micro_batch_size` x `seq_len` (the longest batch sets the peak). The measured
  one has one padded position, as real batches of varying lengths do: a model skips building its
  attention mask for a batch without padding, which the trace, seeing no values, cannot know.
- Storages, not tensors: a view shares its base's storage and is counted once (keyed by the storage's
  identity); a storage is subtracted when it is freed (a weak reference on it; torch keeps a storage's
  Python object alive exactly as long as the storage itself).
- Estimating for CUDA: on a machine with CUDA the fake tensors live on the GPU, so kernels, autocast
  lists and the optimizer's multi-tensor path are the GPU's; without one (planning for a GPU on a CPU
  machine) the step is traced on the CPU and corrected for what differs: the caching allocator rounds
  every block up to 512 bytes, the optimizer takes its multi-tensor (foreach) path, and cuBLAS holds a
  workspace per thread that runs matmuls (forward and autograd's backward thread) -- counted under
  "workspace". Attention on the CPU already uses a fused (flash) kernel as on the GPU, so the S x S score
  matrix is not materialised on either.
- What cannot run on fake tensors is replaced by a stand-in with the same memory: bitsandbytes' 8-bit
  AdamW (its state is allocated from the exact analytic layout of `optimizer_state_bytes`); qlora's
  4-bit layers are quantized by bitsandbytes itself (its ops have fake kernels) and run by qlora's own
  class, but built around a plain parameter, since bitsandbytes' Params4bit refuses fake tensors. Each
  substitution is named in the estimate's `notes`.
"""

from autopeft.memory.analytic import (
    activation_bytes,
    autocast_copy_bytes,
    estimate,
    logits_bytes,
    optimizer_state_bytes,
)
from autopeft.memory.cuda_allocator import CachingAllocator, cuda_workspace_bytes
from autopeft.memory.live_bytes import EXTRAS, GRADIENTS, OPTIMIZER, TRAINABLE, WEIGHTS, LiveBytes
from autopeft.memory.measured import measure, synthetic_split
from autopeft.memory.result import PARTS, MemoryEstimate
from autopeft.memory.traced import estimate_extrapolated, estimate_traced, warm_up
from autopeft.memory.traced_step import STEPS, steady_settings

__all__ = [
    "EXTRAS", "GRADIENTS", "OPTIMIZER", "PARTS", "STEPS", "TRAINABLE", "WEIGHTS", "CachingAllocator", "LiveBytes",
    "MemoryEstimate", "activation_bytes", "autocast_copy_bytes", "cuda_workspace_bytes", "estimate",
    "estimate_extrapolated", "estimate_traced", "logits_bytes", "measure", "optimizer_state_bytes",
    "steady_settings", "synthetic_split", "warm_up",
]
