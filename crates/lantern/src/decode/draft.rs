//! Drafting a tree for every image of a batch, level by level, through an [`Expand`] callback
//! that runs the drafter. Static shapes are filled here (top-k when greedy, draws without
//! replacement when sampling) without a host round trip per level: each level's picks stay
//! where the drafter's rows are, the next level's tokens are gathered from them there, and the
//! host reads every level's picks in one transfer at the end. The EAGLE-2 dynamic tree is in
//! [`super::dynamic`].
use super::level::{level_uniforms, widest, DraftLevel, Want};
use super::static_trees::TreeShape;
use super::tree::{DraftKind, DraftTree, QDist};
use crate::sampling::sample_index_at;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, RngCore};

/// Drafter access for the tree builders.
pub trait Expand {
    /// Feeds one level of nodes for every image and returns the drafter distributions (after
    /// CFG and the sampling filters) of the token after each, as a [`DraftLevel`] whose row i
    /// of image g follows the i-th node fed for it.
    ///
    /// `tokens` `[n_img, k]` (u32, on any device) holds in row g the tokens of the nodes fed
    /// for image g; `parents[g][i]` is the index of node i's parent among all nodes fed earlier
    /// for image g in this tree (in feeding order), or `None` when the parent is the root.
    /// Every image feeds the same number of nodes per call, all at the same depth.
    fn expand(
        &mut self,
        tokens: &Tensor,
        parents: &[Vec<Option<usize>>],
    ) -> Result<Box<dyn DraftLevel>>;
}

/// Host token lists `[n_img][k]` as the `tokens` of [`Expand::expand`] (a CPU tensor).
pub fn token_tensor(tokens: &[Vec<u32>]) -> Result<Tensor> {
    let k = tokens.first().map_or(0, |t| t.len());
    let flat: Vec<u32> = tokens.concat();
    Ok(Tensor::from_vec(flat, (tokens.len(), k), &Device::Cpu)?)
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
///
/// Linear in `p.len()` (a selection, then a sort of the `k` picks): called for every drafted
/// node of every image, so a full sort of the vocabulary would dominate batched drafting.
pub fn top_k_indices(p: &[f32], k: usize) -> Vec<usize> {
    // a total order (indices are distinct), so selection + sort equals a full sort's prefix
    let order = |a: &usize, b: &usize| p[*b].total_cmp(&p[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..p.len()).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}

/// One depth of a static shape: the shape nodes asked for children at this depth (every node
/// of the previous depth that has children, in feeding order: its row in the level) and the
/// nodes of this depth fed to the drafter afterwards (those with children of their own).
#[derive(Debug, Clone)]
pub(super) struct Depth {
    /// `(shape node, its row in the level, its children in rank order)`.
    pub requests: Vec<(usize, usize, Vec<usize>)>,
    /// Fed shape nodes: `(node, request of its parent, its rank among the parent's children)`.
    pub feed: Vec<(usize, usize, usize)>,
}

impl Depth {
    /// The requests of every image (image-major), as the level is asked for them.
    pub fn want(&self, n_img: usize) -> Vec<Want> {
        (0..n_img)
            .flat_map(|g| {
                self.requests
                    .iter()
                    .map(move |&(_, row, ref c)| Want { g, row, k: c.len() })
            })
            .collect()
    }

    /// Where the token of child `rank` of request `r` of image `g` lies in this depth's flat
    /// pick block (`[n_img * requests, k, 2]` pairs, flattened).
    pub fn token_index(&self, g: usize, k: usize, r: usize, rank: usize) -> usize {
        ((g * self.requests.len() + r) * k + rank) * 2
    }

    /// [`Depth::token_index`] of every image's fed nodes, image-major.
    pub fn fed_token_at(&self, n_img: usize, k: usize) -> Vec<u32> {
        (0..n_img)
            .flat_map(|g| {
                self.feed
                    .iter()
                    .map(move |&(_, r, rank)| self.token_index(g, k, r, rank) as u32)
            })
            .collect()
    }
}

/// The depths of a static shape, depth 1 first.
pub(super) fn plan(shape: &TreeShape) -> Vec<Depth> {
    let max_depth = shape.max_depth();
    let mut rows: Vec<usize> = vec![0];
    let mut out = Vec::with_capacity(max_depth);
    for _ in 1..=max_depth {
        let requests: Vec<(usize, usize, Vec<usize>)> = rows
            .iter()
            .enumerate()
            .map(|(row, &n)| (n, row, shape.children(n)))
            .filter(|(_, _, c)| !c.is_empty())
            .collect();
        let mut feed = Vec::new();
        for (r, (_, _, children)) in requests.iter().enumerate() {
            for (rank, &c) in children.iter().enumerate() {
                if !shape.children(c).is_empty() {
                    feed.push((c, r, rank));
                }
            }
        }
        // feeding order: shape order (the order the drafter cache holds the nodes in)
        feed.sort_unstable();
        rows = feed.iter().map(|f| f.0).collect();
        out.push(Depth { requests, feed });
    }
    out
}

/// Fills a static shape for every image. `root_tokens[g]` is image g's root, row 0 of image g
/// in `root` the drafter distribution after it. Greedy: the children of a node are its drafter
/// top-k (q = 1, [`DraftKind::Deterministic`]). Sampling: they are drawn without replacement
/// (each request takes exactly as many uniforms from its image's stream as the node has
/// children, see [`level_uniforms`]), q is the conditional probability and the node's
/// distribution is kept ([`DraftKind::WithoutReplacement`]). Children that cannot be drawn (no
/// mass left) are dropped with their subtrees, so trees may be smaller than the shape.
///
/// Every level asks its [`DraftLevel`] once for a pick block of every image's nodes; the next
/// level's tokens are gathered from it where it lies (a dropped child is fed as token 0: its
/// outputs are never read), so the levels run without waiting for the host, which reads all
/// pick blocks in one transfer after the last level and builds the trees.
pub fn draft_static(
    shape: &TreeShape,
    root_tokens: &[u32],
    root: Box<dyn DraftLevel>,
    greedy: bool,
    expand: &mut dyn Expand,
    rngs: &mut [&mut dyn RngCore],
) -> Result<Vec<DraftTree>> {
    let n_img = root_tokens.len();
    let depths = plan(shape);
    // shape node -> index among fed nodes
    let mut fed_of: Vec<Option<usize>> = vec![None; shape.len()];
    let mut n_fed = 0;
    let mut level = root;
    // per depth: its level (kept for the sampled nodes' distributions), block width, block
    let mut done: Vec<(Box<dyn DraftLevel>, usize, Tensor)> = Vec::with_capacity(depths.len());
    for (i, d) in depths.iter().enumerate() {
        let want = d.want(n_img);
        let k = widest(&want, level.vocab());
        let uniforms = (!greedy).then(|| level_uniforms(&want, k, rngs));
        let block = level.pick_block(&want, uniforms)?;
        let next = if i + 1 < depths.len() && !d.feed.is_empty() && k > 0 {
            // tokens of the fed nodes, gathered from the block
            let at = Tensor::from_vec(
                d.fed_token_at(n_img, k),
                n_img * d.feed.len(),
                block.device(),
            )?;
            let tokens = block
                .flatten_all()?
                .index_select(&at, 0)?
                .maximum(0f32)?
                .to_dtype(DType::U32)?
                .reshape((n_img, d.feed.len()))?;
            let parents: Vec<Option<usize>> = d
                .feed
                .iter()
                .map(|&(s, _, _)| {
                    let p = shape.parents[s];
                    if p == 0 {
                        None
                    } else {
                        fed_of[p]
                    }
                })
                .collect();
            for &(s, _, _) in &d.feed {
                fed_of[s] = Some(n_fed);
                n_fed += 1;
            }
            Some(expand.expand(&tokens, &vec![parents; n_img])?)
        } else {
            None
        };
        done.push((level, k, block));
        match next {
            Some(l) => level = l,
            None => break,
        }
    }
    let picks = blocks_to_host(done.iter().map(|d| &d.2))?;
    let ks: Vec<usize> = done.iter().map(|d| d.1).collect();
    let dist = |i: usize, g: usize, row: usize| done[i].0.dist(g, row);
    Ok(build_trees(shape, &depths, root_tokens, greedy, &ks, &dist, &picks)?.0)
}

/// Every pick block's values on the host: one transfer when they share a device.
pub(super) fn blocks_to_host<'a>(
    blocks: impl Iterator<Item = &'a Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let blocks: Vec<&Tensor> = blocks.collect();
    let flat: Vec<Tensor> = blocks
        .iter()
        .map(|b| b.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let one_device = flat
        .windows(2)
        .all(|w| w[0].device().same_device(w[1].device()));
    if flat.is_empty() || !one_device {
        return flat.iter().map(|t| Ok(t.to_vec1()?)).collect();
    }
    let all: Vec<f32> = Tensor::cat(&flat, 0)?.to_vec1()?;
    let mut out = Vec::with_capacity(flat.len());
    let mut at = 0;
    for t in &flat {
        let n = t.elem_count();
        out.push(all[at..at + n].to_vec());
        at += n;
    }
    Ok(out)
}

/// The trees of [`draft_static`] from every depth's pick block on the host (`picks[i]`: depth
/// i+1's, `ks[i]` wide); `dist(i, g, row)` is row `row` of image g of the level depth i+1 was
/// picked from (kept for sampled nodes). Also returns, per tree, the shape node of every tree
/// node (the identity unless children were dropped).
pub(super) fn build_trees(
    shape: &TreeShape,
    depths: &[Depth],
    root_tokens: &[u32],
    greedy: bool,
    ks: &[usize],
    dist: &dyn Fn(usize, usize, usize) -> Result<QDist>,
    picks: &[Vec<f32>],
) -> Result<(Vec<DraftTree>, Vec<Vec<usize>>)> {
    let kind = if greedy {
        DraftKind::Deterministic
    } else {
        DraftKind::WithoutReplacement
    };
    let mut trees = Vec::with_capacity(root_tokens.len());
    let mut nodes = Vec::with_capacity(root_tokens.len());
    for (g, &root) in root_tokens.iter().enumerate() {
        let mut t = DraftTree {
            tokens: vec![root],
            parents: vec![0],
            depths: vec![0],
            q: vec![1.0],
            q_dists: vec![None],
            kind,
        };
        // shape node -> tree node, and back
        let mut map: Vec<Option<usize>> = vec![None; shape.len()];
        map[0] = Some(0);
        let mut of_node = vec![0];
        for (i, ((d, &k), block)) in depths.iter().zip(ks).zip(picks).enumerate() {
            let (n_req, depth) = (d.requests.len(), i + 1);
            for (r, (parent, row, children)) in d.requests.iter().enumerate() {
                let Some(tp) = map[*parent] else { continue };
                if !greedy {
                    t.q_dists[tp] = Some(dist(i, g, *row)?);
                }
                let row = &block[(g * n_req + r) * k * 2..(g * n_req + r + 1) * k * 2];
                for (&c, pair) in children.iter().zip(row.chunks_exact(2)) {
                    if pair[0] < 0.0 {
                        break;
                    }
                    t.tokens.push(pair[0] as u32);
                    t.parents.push(tp);
                    t.depths.push(depth);
                    t.q.push(if greedy { 1.0 } else { pair[1] });
                    t.q_dists.push(None);
                    map[c] = Some(t.len() - 1);
                    of_node.push(c);
                }
            }
        }
        trees.push(t);
        nodes.push(of_node);
    }
    Ok((trees, nodes))
}

/// Draws up to `k` distinct indices from `p` without replacement; each with its conditional
/// probability `p_j / (1 - sum of earlier draws)`. Takes exactly `k` uniforms from `rng` (as a
/// level's draws do, [`level_uniforms`]) and stops early when no mass is left.
pub fn draw_without_replacement(p: &[f32], k: usize, rng: &mut dyn RngCore) -> Vec<(usize, f32)> {
    let us: Vec<f64> = (0..k).map(|_| rng.random::<f64>()).collect();
    draw_with_uniforms(p, &us)
}

/// [`draw_without_replacement`] with its uniforms given: draws until `us` or the mass runs
/// out, the i-th draw taking `us[i]` (so `us` = the rng's next `k` uniforms gives the same
/// result).
pub fn draw_with_uniforms(p: &[f32], us: &[f64]) -> Vec<(usize, f32)> {
    let mut it = us.iter();
    draws(p, us.len(), || it.next().copied().unwrap_or(0.0))
}

fn draws(p: &[f32], k: usize, mut uniform: impl FnMut() -> f64) -> Vec<(usize, f32)> {
    let mut rem = p.to_vec();
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        let total: f32 = rem.iter().sum();
        if total <= 0.0 {
            break;
        }
        let x = sample_index_at(&rem, uniform());
        if rem[x] <= 0.0 {
            break;
        }
        out.push((x, (rem[x] / total).clamp(0.0, 1.0)));
        rem[x] = 0.0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use crate::decode::level::HostLevel;
    use crate::decode::test_util::Table;

    #[test]
    fn top_k_equals_the_prefix_of_a_full_sort() {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(5);
        for v in [1usize, 2, 7, 64, 300] {
            // few distinct values: many ties, which must go to the lower index
            let p: Vec<f32> = (0..v)
                .map(|_| rng.random_range(0..6) as f32 / 5.0)
                .collect();
            let mut full: Vec<usize> = (0..v).collect();
            full.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            for k in [0, 1, 3, v - 1, v, v + 2] {
                assert_eq!(
                    top_k_indices(&p, k),
                    full[..k.min(v)].to_vec(),
                    "v {v} k {k}"
                );
            }
        }
    }

    #[test]
    fn greedy_static_tree_is_top_k_of_each_node() {
        // after token t: mass on (t+1)%4 > (t+2)%4 > ...
        let table: Vec<Vec<f32>> = (0..4)
            .map(|t| {
                let mut r = vec![0.0; 4];
                r[(t + 1) % 4] = 0.5;
                r[(t + 2) % 4] = 0.3;
                r[(t + 3) % 4] = 0.15;
                r[t] = 0.05;
                r
            })
            .collect();
        let shape = TreeShape::from_json("[[0],[1],[0,0],[0,1],[1,0],[0,0,0]]").unwrap();
        let mut d = Table {
            table: table.clone(),
            fed: vec![],
        };
        let mut rng = StdRng::seed_from_u64(0);
        let mut rngs: Vec<&mut dyn RngCore> = vec![&mut rng];
        let t = draft_static(
            &shape,
            &[0],
            Box::new(HostLevel::roots(vec![table[0].clone()])),
            true,
            &mut d,
            &mut rngs,
        )
        .unwrap()
        .remove(0);
        assert_eq!(t.tokens, vec![0, 1, 2, 2, 3, 3, 3]);
        assert_eq!(t.parents, vec![0, 0, 0, 1, 1, 2, 3]);
        assert_eq!(t.kind, DraftKind::Deterministic);
        // level 2 feeds nodes [0] and [1]; level 3 feeds [0,0] whose parent is fed node 0
        assert_eq!(d.fed[0].0, vec![vec![1, 2]]);
        assert_eq!(d.fed[0].1, vec![vec![None, None]]);
        assert_eq!(d.fed[1].0, vec![vec![2]]);
        assert_eq!(d.fed[1].1, vec![vec![Some(0)]]);
    }

    #[test]
    fn trees_from_pick_blocks_map_nodes_to_shape_columns_past_dropped_nodes() {
        // the root drafts two of its three children; [2] and so its child are dropped
        let shape = TreeShape::from_json("[[0],[1],[2],[0,0],[2,0]]").unwrap();
        let depths = plan(&shape);
        assert_eq!(depths.len(), 2);
        let picks = vec![
            vec![5.0, 0.5, 7.0, 0.5, -1.0, 0.0],
            // depth 2: requests for [0] and [2] (in feeding order), one pick each
            vec![9.0, 1.0, 3.0, 1.0],
        ];
        let dist = |_: usize, _: usize, _: usize| Ok(QDist::Host(vec![1.0]));
        let (trees, cols) =
            build_trees(&shape, &depths, &[2], false, &[3, 1], &dist, &picks).unwrap();
        assert_eq!(trees[0].tokens, vec![2, 5, 7, 9]);
        assert_eq!(trees[0].parents, vec![0, 0, 0, 1]);
        assert_eq!(trees[0].q[1..], [0.5, 0.5, 1.0]);
        assert_eq!(cols[0], vec![0, 1, 2, 4]);
        trees[0].validate().unwrap();
    }

    #[test]
    fn sampled_children_are_distinct_with_conditional_q_and_pruned_when_mass_runs_out() {
        let root = vec![0.5, 0.5, 0.0];
        let shape = TreeShape::from_json("[[0],[1],[2],[2,0]]").unwrap();
        let mut d = Table {
            table: vec![vec![1.0, 0.0, 0.0]; 3],
            fed: vec![],
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mut rngs: Vec<&mut dyn RngCore> = vec![&mut rng];
        let roots = Box::new(HostLevel::roots(vec![root.clone()]));
        let t = draft_static(&shape, &[2], roots, false, &mut d, &mut rngs)
            .unwrap()
            .remove(0);
        // only two tokens have mass: rank 2 and its child are dropped
        assert_eq!(t.len(), 3);
        assert_ne!(t.tokens[1], t.tokens[2]);
        assert_eq!(t.q[1], 0.5);
        assert_eq!(t.q[2], 1.0);
        assert_eq!(t.q_dists[0], Some(root.into()));
        assert_eq!(t.kind, DraftKind::WithoutReplacement);
        t.validate().unwrap();
    }
}
