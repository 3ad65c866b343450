//! CUDA graphs whose edges into our kernels are programmatic (Hopper's PDL inside a graph).
//!
//! Stream capture records our launches' programmatic-serialisation attribute, but the edges it
//! builds between kernel nodes are full dependencies, so a replayed graph starts each of our
//! kernels only after its predecessor has drained. [`CapturedGraph::end_capture`] turns every
//! kernel-to-kernel edge whose destination is one of our kernels (which all wait with
//! `griddepcontrol.wait` before dependent reads and writes, see `launch.rs`) into a
//! programmatic edge, then instantiates the graph.
use super::launch;
use super::pdl_plan::{relaxed_edges, Kind};
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
        // the rewrite works on a copy: if the driver refuses it, the captured graph is used
        let mut chosen = None;
        if launch::enabled() {
            // SAFETY: `graph` is valid; the clone is ours.
            if let Ok((clone, edges)) = unsafe { relaxed_copy(graph) } {
                match instantiate(clone) {
                    Ok(exec) => {
                        // SAFETY: the original is no longer needed.
                        unsafe { sys::cuGraphDestroy(graph) };
                        chosen = Some((clone, exec, edges));
                    }
                    // SAFETY: the clone is ours and not used after this.
                    Err(_) => unsafe {
                        sys::cuGraphDestroy(clone);
                    },
                }
            }
        }
        let (graph, exec, edges) = match chosen {
            Some(c) => c,
            None => match instantiate(graph) {
                Ok(exec) => (graph, exec, (0, 0)),
                Err(e) => {
                    // SAFETY: the graph is ours and not used after this.
                    unsafe { sys::cuGraphDestroy(graph) };
                    return Err(e);
                }
            },
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

/// Instantiates `graph` with auto-free-on-launch.
fn instantiate(graph: sys::CUgraph) -> Result<sys::CUgraphExec, DriverError> {
    let mut exec: sys::CUgraphExec = null_mut();
    let flags =
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH.0 as u64;
    // SAFETY: valid graph; `exec` is written on success.
    unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, flags) }.result()?;
    Ok(exec)
}

/// A copy of `graph` with programmatic edges into our kernels (see [`make_programmatic`]),
/// with (programmatic edges, all edges); an error when there is nothing to relax.
///
/// # Safety
/// `graph` must be a valid graph.
unsafe fn relaxed_copy(graph: sys::CUgraph) -> Result<(sys::CUgraph, (usize, usize)), DriverError> {
    let mut clone: sys::CUgraph = null_mut();
    // SAFETY: valid graph; the clone is written on success.
    unsafe { sys::cuGraphClone(&mut clone, graph) }.result()?;
    // SAFETY: the clone is valid and not instantiated.
    match unsafe { make_programmatic(clone) } {
        Ok(edges) if edges.0 > 0 => Ok((clone, edges)),
        r => {
            // SAFETY: the clone is ours and not used after this.
            unsafe { sys::cuGraphDestroy(clone) };
            Err(r
                .err()
                .unwrap_or(DriverError(sys::cudaError_enum::CUDA_ERROR_NOT_SUPPORTED)))
        }
    }
}

fn node_type(node: sys::CUgraphNode) -> Result<sys::CUgraphNodeType, DriverError> {
    let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    // SAFETY: a node of a live graph.
    unsafe { sys::cuGraphNodeGetType(node, &mut t) }.result()?;
    Ok(t)
}

fn kind(node: sys::CUgraphNode) -> Result<Kind, DriverError> {
    use sys::CUgraphNodeType as T;
    Ok(match node_type(node)? {
        T::CU_GRAPH_NODE_TYPE_KERNEL => {
            // SAFETY: plain C struct filled by the driver for a kernel node.
            let mut params: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
            // SAFETY: `node` is a kernel node of a live graph.
            unsafe { sys::cuGraphKernelNodeGetParams_v2(node, &mut params) }.result()?;
            let name = launch::kernel_name(params.func, params.kern);
            Kind::Kernel(name.as_deref().is_some_and(launch::is_ours))
        }
        T::CU_GRAPH_NODE_TYPE_MEM_ALLOC => Kind::Memory(true),
        T::CU_GRAPH_NODE_TYPE_MEM_FREE => Kind::Memory(false),
        _ => Kind::Other,
    })
}

fn zero_edge() -> sys::CUgraphEdgeData {
    sys::CUgraphEdgeData {
        from_port: 0,
        to_port: 0,
        type_: 0,
        reserved: [0; 5],
    }
}

/// Gives a captured graph programmatic edges into our kernels (see [`relaxed_edges`]); only a
/// single chain (one stream, no forks) is rewritten. Returns (programmatic edges, all edges).
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
    let mut data = vec![zero_edge(); n];
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
    // a chain: one successor per node, one root
    use std::collections::HashMap;
    let next: HashMap<usize, usize> = (0..n).map(|i| (from[i] as usize, i)).collect();
    let has_pred: std::collections::HashSet<usize> = to.iter().map(|&t| t as usize).collect();
    let roots: Vec<sys::CUgraphNode> = from
        .iter()
        .copied()
        .filter(|&f| !has_pred.contains(&(f as usize)))
        .collect();
    if next.len() != n || has_pred.len() != n || roots.len() != 1 {
        return Ok((0, n));
    }
    let mut order = vec![roots[0]];
    while let Some(&i) = next.get(&(*order.last().expect("non-empty") as usize)) {
        order.push(to[i]);
        if order.len() > n + 1 {
            return Ok((0, n));
        }
    }
    let kinds = order
        .iter()
        .map(|&v| kind(v))
        .collect::<Result<Vec<_>, _>>()?;
    let (plan, made) = relaxed_edges(&kinds);
    if made == 0 {
        return Ok((0, n));
    }
    let mut f = Vec::with_capacity(plan.len());
    let mut t = Vec::with_capacity(plan.len());
    let mut d = Vec::with_capacity(plan.len());
    for e in &plan {
        f.push(order[e.from]);
        t.push(order[e.to]);
        let mut data = zero_edge();
        if e.programmatic {
            data.from_port = sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8;
            data.type_ = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
        }
        d.push(data);
    }
    // SAFETY: removes exactly the listed edges, then adds the new ones between nodes of this
    // graph.
    unsafe {
        sys::cuGraphRemoveDependencies_v2(graph, from.as_ptr(), to.as_ptr(), data.as_ptr(), n)
            .result()?;
        sys::cuGraphAddDependencies_v2(graph, f.as_ptr(), t.as_ptr(), d.as_ptr(), f.len())
            .result()?;
    }
    Ok((made, plan.len()))
}
