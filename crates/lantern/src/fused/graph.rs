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
        // the rewrite is undone when the driver refuses the relaxed graph (graphs with memory
        // nodes cannot be cloned, so it edits the captured graph itself)
        let debug = std::env::var("LANTERN_GRAPH_DEBUG").is_ok();
        let mut done = None;
        if launch::enabled() {
            // SAFETY: `graph` is valid and not instantiated.
            match unsafe { make_programmatic(graph) } {
                Ok(Some((old, new, counts))) => match instantiate(graph) {
                    Ok(exec) => done = Some((exec, counts)),
                    Err(e) => {
                        if debug {
                            eprintln!("[graph] relaxed graph refused: {e:?}");
                        }
                        // SAFETY: restores the captured edges of this graph.
                        unsafe {
                            let _ = new.apply(graph, false);
                            let _ = old.apply(graph, true);
                        }
                    }
                },
                Ok(None) => {}
                Err(e) if debug => eprintln!("[graph] edges not relaxed: {e:?}"),
                Err(_) => {}
            }
        }
        let (exec, edges) = match done {
            Some(d) => d,
            None => match instantiate(graph) {
                Ok(exec) => (exec, (0, 0)),
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

/// Edges of a graph, as the driver's parallel arrays.
#[derive(Default)]
struct EdgeList {
    from: Vec<sys::CUgraphNode>,
    to: Vec<sys::CUgraphNode>,
    data: Vec<sys::CUgraphEdgeData>,
}

impl EdgeList {
    /// Adds (`add`) or removes the edges in `graph`.
    ///
    /// # Safety
    /// The nodes must belong to `graph`, which must not be instantiating or running.
    unsafe fn apply(&self, graph: sys::CUgraph, add: bool) -> Result<(), DriverError> {
        let (f, t, d, n) = (
            self.from.as_ptr(),
            self.to.as_ptr(),
            self.data.as_ptr(),
            self.from.len(),
        );
        // SAFETY: the arrays hold `n` entries each; the caller vouches for the nodes.
        unsafe {
            if add {
                sys::cuGraphAddDependencies_v2(graph, f, t, d, n)
            } else {
                sys::cuGraphRemoveDependencies_v2(graph, f, t, d, n)
            }
        }
        .result()
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

/// A rewrite applied to a graph: the edges removed, the edges added, and (programmatic edges,
/// all edges).
type Rewrite = (EdgeList, EdgeList, (usize, usize));

/// Gives a captured graph programmatic edges into our kernels (see [`relaxed_edges`]); only a
/// single chain (one stream, no forks) is rewritten. Returns the edges removed and added
/// (to undo it) and (programmatic edges, all edges), or `None` when nothing changed.
///
/// # Safety
/// `graph` must be a valid graph that is not being instantiated or launched.
unsafe fn make_programmatic(graph: sys::CUgraph) -> Result<Option<Rewrite>, DriverError> {
    let mut n = 0usize;
    // SAFETY: null arrays ask for the count only.
    unsafe { sys::cuGraphGetEdges_v2(graph, null_mut(), null_mut(), null_mut(), &mut n) }
        .result()?;
    let mut old = EdgeList {
        from: vec![null_mut(); n],
        to: vec![null_mut(); n],
        data: vec![zero_edge(); n],
    };
    // SAFETY: the arrays hold `n` entries each.
    unsafe {
        sys::cuGraphGetEdges_v2(
            graph,
            old.from.as_mut_ptr(),
            old.to.as_mut_ptr(),
            old.data.as_mut_ptr(),
            &mut n,
        )
    }
    .result()?;
    let debug = std::env::var("LANTERN_GRAPH_DEBUG").is_ok();
    // a chain: one successor per node, one root
    use std::collections::{HashMap, HashSet};
    let next: HashMap<usize, usize> = (0..n).map(|i| (old.from[i] as usize, i)).collect();
    let has_pred: HashSet<usize> = old.to.iter().map(|&t| t as usize).collect();
    let roots: Vec<sys::CUgraphNode> = old
        .from
        .iter()
        .copied()
        .filter(|&f| !has_pred.contains(&(f as usize)))
        .collect();
    if n == 0 || next.len() != n || has_pred.len() != n || roots.len() != 1 {
        if debug {
            eprintln!(
                "[graph] not a chain: {n} edges, {} sources, {} targets, {} roots",
                next.len(),
                has_pred.len(),
                roots.len()
            );
        }
        return Ok(None);
    }
    let mut order = vec![roots[0]];
    while let Some(&i) = next.get(&(*order.last().expect("non-empty") as usize)) {
        order.push(old.to[i]);
        if order.len() > n + 1 {
            return Ok(None);
        }
    }
    let kinds = order
        .iter()
        .map(|&v| kind(v))
        .collect::<Result<Vec<_>, _>>()?;
    let (plan, made) = relaxed_edges(&kinds);
    if debug {
        let count = |k: Kind| kinds.iter().filter(|&&x| x == k).count();
        eprintln!(
            "[graph] chain of {}: ours {}, other kernels {}, allocs {}, frees {}, other {}; {made} programmatic",
            kinds.len(),
            count(Kind::Kernel(true)),
            count(Kind::Kernel(false)),
            count(Kind::Memory(true)),
            count(Kind::Memory(false)),
            count(Kind::Other)
        );
    }
    if made == 0 {
        return Ok(None);
    }
    let mut new = EdgeList::default();
    for e in &plan {
        new.from.push(order[e.from]);
        new.to.push(order[e.to]);
        let mut data = zero_edge();
        if e.programmatic {
            data.from_port = sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8;
            data.type_ = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
        }
        new.data.push(data);
    }
    // SAFETY: the listed edges exist in this graph; the new ones join its nodes.
    unsafe {
        old.apply(graph, false)?;
        if let Err(e) = new.apply(graph, true) {
            let _ = old.apply(graph, true);
            return Err(e);
        }
    }
    Ok(Some((old, new, (made, plan.len()))))
}
