//! Drafting a tree for every image of a batch, level by level, through an [`Expand`] callback
//! that runs the drafter. Static shapes are filled here (top-k when greedy, draws without
//! replacement when sampling); the EAGLE-2 dynamic tree is in [`super::dynamic`].
use super::level::{DraftLevel, Want};
use super::static_trees::TreeShape;
use super::tree::{DraftKind, DraftTree};
use crate::sampling::sample_index_at;
use crate::Result;
use rand::{Rng, RngCore};

/// Drafter access for the tree builders.
pub trait Expand {
    /// Feeds one level of nodes for every image and returns the drafter distributions (after
    /// CFG and the sampling filters) of the token after each, as a [`DraftLevel`] whose row i
    /// of image g follows the i-th node fed for it.
    ///
    /// `tokens[g][i]` is the token of the i-th node fed for image g; `parents[g][i]` is the
    /// index of its parent among all nodes fed earlier for image g in this tree (in feeding
    /// order), or `None` when the parent is the root. Every image feeds the same number of
    /// nodes per call, all at the same depth.
    fn expand(
        &mut self,
        tokens: &[Vec<u32>],
        parents: &[Vec<Option<usize>>],
    ) -> Result<Box<dyn DraftLevel>>;
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

/// Fills a static shape for every image. `root_tokens[g]` is image g's root, row 0 of image g
/// in `root` the drafter distribution after it. Greedy: the children of a node are its drafter
/// top-k (q = 1, [`DraftKind::Deterministic`]). Sampling: they are drawn without replacement,
/// q is the conditional probability and the node's distribution is kept
/// ([`DraftKind::WithoutReplacement`]). Children that cannot be drawn (no mass left) are
/// dropped with their subtrees, so trees may be smaller than the shape. Each level asks its
/// [`DraftLevel`] once for the picks of every image.
pub fn draft_static(
    shape: &TreeShape,
    root_tokens: &[u32],
    root: Box<dyn DraftLevel>,
    greedy: bool,
    expand: &mut dyn Expand,
    rngs: &mut [&mut dyn RngCore],
) -> Result<Vec<DraftTree>> {
    let n_img = root_tokens.len();
    let kind = if greedy {
        DraftKind::Deterministic
    } else {
        DraftKind::WithoutReplacement
    };
    let mut trees: Vec<DraftTree> = root_tokens
        .iter()
        .map(|&t| DraftTree {
            tokens: vec![t],
            parents: vec![0],
            depths: vec![0],
            q: vec![1.0],
            q_dists: vec![None],
            kind,
        })
        .collect();
    // shape node -> tree node, per image
    let mut map: Vec<Vec<Option<usize>>> = vec![vec![None; shape.len()]; n_img];
    for m in map.iter_mut() {
        m[0] = Some(0);
    }
    // shape node -> index among fed nodes
    let mut fed_of: Vec<Option<usize>> = vec![None; shape.len()];
    let mut n_fed = 0;
    let max_depth = shape.depths.iter().copied().max().unwrap_or(0);
    // the level whose rows hold the distributions after `level_nodes` (shape nodes)
    let mut level = root;
    let mut level_nodes: Vec<usize> = vec![0];
    for depth in 1..=max_depth {
        let mut want = Vec::new();
        let mut owners = Vec::new();
        for (g, m) in map.iter().enumerate() {
            for (row, &parent) in level_nodes.iter().enumerate() {
                let Some(tp) = m[parent] else { continue };
                let children = shape.children(parent);
                if children.is_empty() {
                    continue;
                }
                want.push(Want {
                    g,
                    row,
                    k: children.len(),
                });
                owners.push((tp, children));
            }
        }
        let picks = if greedy {
            level.top_k(&want)?
        } else {
            level.draw(&want, rngs)?
        };
        for ((w, (tp, children)), picks) in want.iter().zip(owners).zip(picks) {
            if !greedy {
                trees[w.g].q_dists[tp] = Some(level.dist(w.g, w.row)?);
            }
            for (&c, (tok, q)) in children.iter().zip(picks) {
                let t = &mut trees[w.g];
                t.tokens.push(tok as u32);
                t.parents.push(tp);
                t.depths.push(depth);
                t.q.push(if greedy { 1.0 } else { q });
                t.q_dists.push(None);
                map[w.g][c] = Some(t.len() - 1);
            }
        }
        if depth == max_depth {
            break;
        }
        // feed the nodes at this depth that have children in the shape
        let feed: Vec<usize> = (1..shape.len())
            .filter(|&i| shape.depths[i] == depth && !shape.children(i).is_empty())
            .collect();
        let mut tokens = vec![Vec::with_capacity(feed.len()); n_img];
        let mut parents = vec![Vec::with_capacity(feed.len()); n_img];
        for (g, m) in map.iter().enumerate() {
            for &s in &feed {
                // a dropped node is fed as a copy of the root (its output is ignored)
                let tok = m[s].map(|t| trees[g].tokens[t]).unwrap_or(root_tokens[g]);
                tokens[g].push(tok);
                let p = shape.parents[s];
                parents[g].push(if p == 0 { None } else { fed_of[p] });
            }
        }
        for &s in &feed {
            fed_of[s] = Some(n_fed);
            n_fed += 1;
        }
        level = expand.expand(&tokens, &parents)?;
        level_nodes = feed;
    }
    Ok(trees)
}

/// Draws up to `k` distinct indices from `p` without replacement; each with its conditional
/// probability `p_j / (1 - sum of earlier draws)`. Stops early when no mass is left (then
/// without drawing a uniform from `rng`: one uniform per returned index, except after a draw
/// that lands on no mass).
pub fn draw_without_replacement(p: &[f32], k: usize, rng: &mut dyn RngCore) -> Vec<(usize, f32)> {
    draws(p, k, || rng.random::<f64>())
}

/// [`draw_without_replacement`] with its uniforms given: draws until `us` or the mass runs
/// out, the i-th draw taking `us[i]` (so `us` = the rng's next `min(k, positive entries)`
/// uniforms gives the same result).
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
