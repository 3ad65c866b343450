# Sourced by the GPU scripts on the device machine: unpacks the carried CUDA binary and points
# the loader at the CUDA 13 libraries of the machine's PyTorch wheels (see ../shared/docs/gpu.md).
export LD_LIBRARY_PATH=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))'):${LD_LIBRARY_PATH:-}
G=${G:-.gpu}
xz -dkf "$G/lantern.xz" && chmod +x "$G/lantern"
L="$G/lantern"
mkdir -p /tmp/cuda-cache && export CUDA_CACHE_PATH=/tmp/cuda-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
