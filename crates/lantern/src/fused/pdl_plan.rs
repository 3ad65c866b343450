//! Which edges of a captured CUDA graph may become programmatic (see `graph.rs`): pure
//! bookkeeping over the nodes of a single-stream chain, kept free of the driver so that it is
//! tested on every machine.

/// What a node of a captured chain is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) enum Kind {
    /// A kernel; `true` when it is one of ours (waits with `griddepcontrol.wait`).
    Kernel(bool),
    /// A stream-ordered allocation (`true`) or free (`false`): candle's allocations, captured.
    Memory(bool),
    /// Anything else (copies, memsets, event nodes): its links are kept.
    Other,
}

/// A dependency between chain positions.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct PlanEdge {
    pub from: usize,
    pub to: usize,
    pub programmatic: bool,
}

/// The edges of a chain of `kinds` (node i followed by node i + 1) after relaxing it, and how
/// many are programmatic.
///
/// Between two kernels P and B, where B is ours and only allocations/frees lie between them
/// (and between P and the kernel P0 before it): B waits for P programmatically (it may start
/// while P drains); the frees after P wait for P; the allocations before B wait for P0 and for
/// the frees between P0 and P (so they may reuse that memory, never memory P still reads) and
/// precede B. Every other link of the chain is kept.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn relaxed_edges(kinds: &[Kind]) -> (Vec<PlanEdge>, usize) {
    let e = |from, to, programmatic| PlanEdge {
        from,
        to,
        programmatic,
    };
    let kernels: Vec<usize> = (0..kinds.len())
        .filter(|&i| matches!(kinds[i], Kind::Kernel(_)))
        .collect();
    let only_memory = |a: usize, b: usize| (a + 1..b).all(|j| matches!(kinds[j], Kind::Memory(_)));
    // relaxed[i]: the chain link into node i is replaced
    let mut relaxed = vec![false; kinds.len()];
    let mut edges = Vec::new();
    let mut made = 0;
    for w in kernels.windows(3) {
        let (p0, p, b) = (w[0], w[1], w[2]);
        if kinds[b] != Kind::Kernel(true) || !only_memory(p0, p) || !only_memory(p, b) {
            continue;
        }
        edges.push(e(p, b, true));
        made += 1;
        relaxed[b] = true;
        let frees0: Vec<usize> = (p0 + 1..p)
            .filter(|&j| kinds[j] == Kind::Memory(false))
            .collect();
        for j in p + 1..b {
            relaxed[j] = true;
            if kinds[j] == Kind::Memory(false) {
                edges.push(e(p, j, false));
            } else {
                edges.push(e(p0, j, false));
                edges.extend(frees0.iter().map(|&f| e(f, j, false)));
                edges.push(e(j, b, false));
            }
        }
    }
    for (i, _) in relaxed.iter().enumerate().skip(1).filter(|(_, r)| !**r) {
        edges.push(e(i - 1, i, false));
    }
    (edges, made)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Nodes reachable from `from` through `edges`.
    fn reach(edges: &[PlanEdge], from: usize) -> HashSet<usize> {
        let mut seen = HashSet::new();
        let mut todo = vec![from];
        while let Some(v) = todo.pop() {
            for e in edges.iter().filter(|e| e.from == v) {
                if seen.insert(e.to) {
                    todo.push(e.to);
                }
            }
        }
        seen
    }

    #[test]
    fn memory_nodes_between_our_kernels_leave_the_chain() {
        use Kind::*;
        // 0 K0 | 1 F0 | 2 K1 ours | 3 F1 | 4 A1 | 5 K2 ours | 6 A2 | 7 K3 cuBLAS | 8 copy | 9 K4 ours
        let kinds = [
            Kernel(false),
            Memory(false),
            Kernel(true),
            Memory(false),
            Memory(true),
            Kernel(true),
            Memory(true),
            Kernel(false),
            Other,
            Kernel(true),
        ];
        let (edges, made) = relaxed_edges(&kinds);
        let has = |a: usize, b: usize, prog: bool| {
            edges
                .iter()
                .any(|e| e.from == a && e.to == b && e.programmatic == prog)
        };
        // K1 has no kernel two before it and K4 has a copy before it: both keep the chain;
        // only K2 waits for K1 programmatically
        assert_eq!(made, 1);
        assert!(has(0, 1, false) && has(1, 2, false));
        assert!(has(2, 5, true));
        assert!(has(2, 3, false), "the free after K1 waits for K1");
        assert!(has(0, 4, false) && has(1, 4, false) && has(4, 5, false));
        assert!(
            !has(3, 4, false),
            "K2's allocation never reuses memory K1 still reads"
        );
        assert!(has(5, 6, false) && has(6, 7, false) && has(7, 8, false) && has(8, 9, false));
        assert_eq!(edges.len(), 2 + 1 + 1 + 3 + 4);
        // everything stays ordered after the first node, and no node waits on itself
        let all = reach(&edges, 0);
        assert!((1..kinds.len()).all(|i| all.contains(&i)));
        assert!((0..kinds.len()).all(|i| !reach(&edges, i).contains(&i)));
        // every kernel still follows the kernel before it
        for w in [0usize, 2, 5, 7, 9].windows(2) {
            assert!(reach(&edges, w[0]).contains(&w[1]), "{w:?}");
        }
    }

    #[test]
    fn a_chain_without_our_kernels_is_unchanged() {
        use Kind::*;
        let kinds = [
            Kernel(false),
            Memory(true),
            Kernel(false),
            Memory(false),
            Kernel(false),
        ];
        let (edges, made) = relaxed_edges(&kinds);
        assert_eq!(made, 0);
        let chain: Vec<PlanEdge> = (1..kinds.len())
            .map(|i| PlanEdge {
                from: i - 1,
                to: i,
                programmatic: false,
            })
            .collect();
        assert_eq!(edges, chain);
    }
}
