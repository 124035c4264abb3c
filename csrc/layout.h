// The memory layout the ops read and write, the rule of ddpm_fast.ops.reference.memory_format_of:
// channels_last only when a 4-d tensor is laid out that way and not also plainly contiguous.
#pragma once

#include <ATen/core/Tensor.h>

namespace ddpm_fast {

inline at::MemoryFormat memory_format_of(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace ddpm_fast
