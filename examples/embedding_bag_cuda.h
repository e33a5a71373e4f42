// The CUDA side of embedding_bag.h: defined in embedding_bag_cuda.cu where
// the build found CUDA (DSVM_EXAMPLE_CUDA), else by stubs in
// embedding_bag.cc that answer "built without CUDA". Only embedding_bag.cc
// and the .cu include this.
#ifndef DSVM_EXAMPLES_EMBEDDING_BAG_CUDA_H_
#define DSVM_EXAMPLES_EMBEDDING_BAG_CUDA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "examples/embedding_bag.h"

namespace dsvm::examples::cuda_impl {

bool Usable(std::string* why);
bool IsDevicePointer(const void* p);
std::unique_ptr<Gatherer> MakeGatherer(uint32_t dim, int gpu, std::string* why);
bool AllocateMapped(size_t bytes, MappedHostBuffer* out, std::string* why);
void FreeMapped(MappedHostBuffer* b);
bool AllocateDevice(size_t bytes, DeviceBuffer* out, std::string* why);
bool CopyToDevice(const DeviceBuffer& b, const void* src, size_t bytes, std::string* why);
void FreeDevice(DeviceBuffer* b);

}  // namespace dsvm::examples::cuda_impl

#endif  // DSVM_EXAMPLES_EMBEDDING_BAG_CUDA_H_
