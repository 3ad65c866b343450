//! Kernel launches as programmatic dependents (Hopper's PDL): a kernel of ours may start while
//! the previous kernel on the stream drains, issue the loads that do not depend on it (weights),
//! and wait for it with `griddepcontrol.wait` before touching its outputs. Every kernel in
//! `kernels.cu` starts with `griddepcontrol.launch_dependents` and waits before its first
//! dependent read or any write, so the overlap is safe; kernels of others (cuBLAS, candle) never
//! trigger early and are serialised as usual. `LANTERN_PDL=0` launches plainly.
//!
//! Measured (docs/BENCHMARKS.md §000): it shortens steps launched one kernel at a time (the
//! launch latency hides behind the previous kernel); inside replayed CUDA graphs, even with
//! every edge into our kernels made programmatic (tried at commit `9292dc7`, reverted), it
//! changed nothing: there the kernels' own dependent phases, not the gaps, set the pace.
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    LaunchConfig, SyncOnDrop,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::Result;
use std::ffi::c_void;
use std::sync::OnceLock;

/// Whether launches ask for programmatic stream serialisation (`LANTERN_PDL`, default on).
pub(super) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LANTERN_PDL").map_or(true, |v| v != "0"))
}

/// One kernel launch being assembled: the arguments (each stored in 8 bytes: the driver reads
/// the parameter's own size from its start) and the stream-ordering guards of the buffers.
pub(super) struct Launch<'a> {
    func: &'a CudaFunction,
    stream: &'a CudaStream,
    vals: Vec<u64>,
    guards: Vec<SyncOnDrop<'a>>,
}

/// A value that can be a kernel argument.
pub(super) trait KernelArg<'a> {
    /// Appends the argument (and the buffer's guard) to `l`.
    fn push(self, l: &mut Launch<'a>);
}

impl<'a, T> KernelArg<'a> for &'a CudaSlice<T> {
    fn push(self, l: &mut Launch<'a>) {
        let (p, g) = self.device_ptr(l.stream);
        l.vals.push(p);
        l.guards.push(g);
    }
}

impl<'a, 'c: 'a, T> KernelArg<'a> for &'a CudaView<'c, T> {
    fn push(self, l: &mut Launch<'a>) {
        let (p, g) = self.device_ptr(l.stream);
        l.vals.push(p);
        l.guards.push(g);
    }
}

impl<'a, T> KernelArg<'a> for &'a mut CudaSlice<T> {
    fn push(self, l: &mut Launch<'a>) {
        let (p, g) = self.device_ptr_mut(l.stream);
        l.vals.push(p);
        l.guards.push(g);
    }
}

impl<'a, 'c: 'a, T> KernelArg<'a> for &'a mut CudaViewMut<'c, T> {
    fn push(self, l: &mut Launch<'a>) {
        let (p, g) = self.device_ptr_mut(l.stream);
        l.vals.push(p);
        l.guards.push(g);
    }
}

/// An optional buffer: a null pointer when absent (how our kernels are told "none").
impl<'a, 'c: 'a, T> KernelArg<'a> for &'a Option<CudaView<'c, T>> {
    fn push(self, l: &mut Launch<'a>) {
        match self {
            Some(v) => v.push(l),
            None => l.vals.push(0),
        }
    }
}

macro_rules! scalar_arg {
    ($($t:ty => $bits:expr),*) => {$(
        impl<'a> KernelArg<'a> for &$t {
            fn push(self, l: &mut Launch<'a>) {
                let f: fn($t) -> u64 = $bits;
                l.vals.push(f(*self));
            }
        }
    )*};
}
scalar_arg!(i32 => |v| v as u32 as u64, f32 => |v| v.to_bits() as u64, u64 => |v| v,
    i64 => |v| v as u64);

impl<'a> Launch<'a> {
    /// A launch of `func` on `stream`.
    pub(super) fn new(func: &'a CudaFunction, stream: &'a CudaStream) -> Self {
        Self {
            func,
            stream,
            vals: Vec::with_capacity(24),
            guards: Vec::with_capacity(8),
        }
    }

    /// Appends one argument, in the kernel signature's order.
    pub(super) fn arg<A: KernelArg<'a>>(&mut self, a: A) -> &mut Self {
        a.push(self);
        self
    }

    /// Submits the kernel, as a programmatic dependent of the previous one when [`enabled`].
    ///
    /// # Safety
    /// The arguments must match the kernel's signature (types and order) and the grid must
    /// keep its accesses in bounds.
    pub(super) unsafe fn launch(self, cfg: LaunchConfig) -> Result<()> {
        // SAFETY: passed on from the caller.
        unsafe { self.launch_with(cfg, false) }
    }

    /// [`Launch::launch`], optionally as a cooperative launch: the driver then guarantees
    /// that every block of the grid is resident at once (or fails the launch), which a kernel
    /// with grid-wide barriers needs.
    ///
    /// # Safety
    /// As for [`Launch::launch`].
    pub(super) unsafe fn launch_with(mut self, cfg: LaunchConfig, cooperative: bool) -> Result<()> {
        let mut ptrs: Vec<*mut c_void> = self
            .vals
            .iter_mut()
            .map(|v| v as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: plain C structs; all-zero is a valid value before the fields are set.
        let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut n = 0;
        if enabled() {
            attrs[n].id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n].value.programmaticStreamSerializationAllowed = 1;
            n += 1;
        }
        if cooperative {
            attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
            attrs[n].value.cooperative = 1;
            n += 1;
        }
        let conf = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: n as u32,
        };
        self.stream.context().bind_to_thread().w()?;
        // SAFETY: the caller vouches for the arguments; `ptrs` points into `self.vals`, which
        // lives until the call returns (the driver copies the parameters at launch).
        unsafe {
            sys::cuLaunchKernelEx(
                &conf,
                self.func.cu_function(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .w()?;
        // the guards record the buffers' use after the launch
        drop(std::mem::take(&mut self.guards));
        Ok(())
    }
}
