//! CUDA graphs whose edges into our kernels are programmatic (Hopper's PDL inside a graph).
//!
//! Stream capture records our launches' programmatic-serialisation attribute, but the edges it
//! builds between kernel nodes are full dependencies, so a replayed graph starts each of our
//! kernels only after its predecessor has drained. [`CapturedGraph::end_capture`] turns every
//! kernel-to-kernel edge whose destination is one of our kernels (which all wait with
//! `griddepcontrol.wait` before dependent reads and writes, see `launch.rs`) into a
//! programmatic edge, then instantiates the graph.
use super::launch;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaStream, DriverError};
use std::ptr::null_mut;
use std::sync::Arc;

/// An instantiated CUDA graph on one stream.
pub struct CapturedGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
    /// Kernel-to-kernel edges made programmatic (into our kernels), and all edges.
    pub edges: (usize, usize),
}

// SAFETY: the handles are only used through the driver API, which is thread-safe; the graph
// is launched on its own stream.
unsafe impl Send for CapturedGraph {}
unsafe impl Sync for CapturedGraph {}

impl CapturedGraph {
    /// Ends the capture begun on `stream` (`None` when nothing was captured), makes the edges
    /// into our kernels programmatic when PDL is on (`LANTERN_PDL`), instantiates the graph
    /// with auto-free-on-launch and uploads it.
    pub fn end_capture(stream: &Arc<CudaStream>) -> Result<Option<Self>, DriverError> {
        stream.context().bind_to_thread()?;
        let mut graph: sys::CUgraph = null_mut();
        // SAFETY: ends the capture this stream is in; the graph handle is written on success.
        unsafe { sys::cuStreamEndCapture(stream.cu_stream(), &mut graph) }.result()?;
        if graph.is_null() {
            return Ok(None);
        }
        let built = (|| {
            let edges = if launch::enabled() {
                // SAFETY: `graph` is a valid, not yet instantiated graph.
                unsafe { make_programmatic(graph)? }
            } else {
                (0, 0)
            };
            let mut exec: sys::CUgraphExec = null_mut();
            let flags =
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH.0
                    as u64;
            // SAFETY: valid graph; `exec` is written on success.
            unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, flags) }.result()?;
            Ok((exec, edges))
        })();
        let (exec, edges) = match built {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: the graph is ours and not used after this.
                unsafe { sys::cuGraphDestroy(graph) };
                return Err(e);
            }
        };
        let g = Self {
            graph,
            exec,
            stream: stream.clone(),
            edges,
        };
        // SAFETY: valid executable graph and stream.
        unsafe { sys::cuGraphUpload(g.exec, stream.cu_stream()) }.result()?;
        Ok(Some(g))
    }

    /// Launches the graph on its stream.
    pub fn launch(&self) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: valid executable graph and stream.
        unsafe { sys::cuGraphLaunch(self.exec, self.stream.cu_stream()) }.result()
    }
}

impl Drop for CapturedGraph {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: both handles are owned by this value and destroyed once.
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
            sys::cuGraphDestroy(self.graph);
        }
    }
}

fn is_kernel(node: sys::CUgraphNode) -> Result<bool, DriverError> {
    let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    // SAFETY: a node of a live graph.
    unsafe { sys::cuGraphNodeGetType(node, &mut t) }.result()?;
    Ok(t == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL)
}

/// Rewrites kernel-to-kernel edges into our kernels as programmatic edges; returns (edges
/// made programmatic or already so, all edges).
///
/// # Safety
/// `graph` must be a valid graph that is not being instantiated or launched.
unsafe fn make_programmatic(graph: sys::CUgraph) -> Result<(usize, usize), DriverError> {
    let mut n = 0usize;
    // SAFETY: null arrays ask for the count only.
    unsafe { sys::cuGraphGetEdges_v2(graph, null_mut(), null_mut(), null_mut(), &mut n) }
        .result()?;
    let mut from = vec![null_mut(); n];
    let mut to = vec![null_mut(); n];
    // SAFETY: plain C struct, all-zero is a valid (default) edge.
    let mut data: Vec<sys::CUgraphEdgeData> = vec![unsafe { std::mem::zeroed() }; n];
    // SAFETY: the arrays hold `n` entries each.
    unsafe {
        sys::cuGraphGetEdges_v2(
            graph,
            from.as_mut_ptr(),
            to.as_mut_ptr(),
            data.as_mut_ptr(),
            &mut n,
        )
    }
    .result()?;
    let programmatic = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
    let mut made = 0;
    for i in 0..n {
        if data[i].type_ == programmatic {
            made += 1;
            continue;
        }
        if !is_kernel(from[i])? || !is_kernel(to[i])? {
            if std::env::var("LANTERN_GRAPH_DEBUG").is_ok() {
                eprintln!("[graph] edge with a node that is not a kernel kept");
            }
            continue;
        }
        // SAFETY: plain C struct filled by the driver.
        let mut params: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
        // SAFETY: `to[i]` is a kernel node of this graph.
        unsafe { sys::cuGraphKernelNodeGetParams_v2(to[i], &mut params) }.result()?;
        let name = launch::kernel_name(params.func, params.kern);
        if !name.as_deref().is_some_and(launch::is_ours) {
            if std::env::var("LANTERN_GRAPH_DEBUG").is_ok() {
                eprintln!("[graph] edge into {name:?} kept");
            }
            continue;
        }
        let edge = sys::CUgraphEdgeData {
            from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
            to_port: 0,
            type_: programmatic,
            reserved: [0; 5],
        };
        // SAFETY: the edge exists (just listed); it is replaced by the same pair of nodes.
        unsafe {
            sys::cuGraphRemoveDependencies_v2(graph, &from[i], &to[i], &data[i], 1).result()?;
            sys::cuGraphAddDependencies_v2(graph, &from[i], &to[i], &edge, 1).result()?;
        }
        made += 1;
    }
    Ok((made, n))
}
