//! The `--modes` grammar of `lantern bench`: `MODE[@kK][/greedy]`, e.g. `ar`, `sd-static/greedy`,
//! `lantern-0.2@k50`, `lantern++-2@k200/greedy`.
use crate::generate_cmd::DecodingArg;
use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

/// The tree a speculative mode verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeChoice {
    /// `--static-tree` (sd-static, LANTERN++).
    Static,
    /// `--dynamic-tree` (sd-dynamic, LANTERN).
    Dynamic,
}

/// One row of the bench table.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchMode {
    /// AR, exact SD, LANTERN or LANTERN++.
    pub kind: DecodingArg,
    /// Tree of the speculative modes (ignored for AR).
    pub tree: TreeChoice,
    /// LANTERN delta (0 otherwise).
    pub delta: f32,
    /// LANTERN++ lambda (1 otherwise).
    pub lambda: f32,
    /// Neighbours per draft for this row (`@kK`); `None` = the global `--k`.
    pub k: Option<usize>,
    /// Temperature 0 for this row (`/greedy`).
    pub greedy: bool,
    base: String,
}

const GRAMMAR: &str = "use MODE[@kK][/greedy] with MODE one of ar, sd-dynamic, sd-static, lantern-DELTA, lantern++-LAMBDA (e.g. lantern-0.2@k50/greedy)";

impl BenchMode {
    /// Whether this row uses a neighbour table (LANTERN or LANTERN++).
    pub fn is_relaxed(&self) -> bool {
        matches!(self.kind, DecodingArg::Lantern | DecodingArg::LanternPp)
    }

    /// Whether this is a plain AR row.
    pub fn is_ar(&self) -> bool {
        self.kind == DecodingArg::Ar
    }

    /// Neighbours per draft for this row given the global `--k` (`None` for AR and exact SD).
    pub fn effective_k(&self, global: usize) -> Option<usize> {
        self.is_relaxed().then(|| self.k.unwrap_or(global))
    }
}

impl FromStr for BenchMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let (head, greedy) = match s.split_once('/') {
            None => (s, false),
            Some((h, "greedy")) => (h, true),
            Some((_, t)) => {
                bail!(
                    "bad mode `{s}`: unknown suffix `/{t}` (the only suffix is /greedy); {GRAMMAR}"
                )
            }
        };
        let (base, k) = match head.split_once('@') {
            None => (head, None),
            Some((b, ks)) => {
                let k = ks
                    .strip_prefix('k')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&k| k > 0);
                match k {
                    Some(k) => (b, Some(k)),
                    None => bail!(
                        "bad mode `{s}`: `@{ks}` is not a neighbour count; write @kK with K >= 1, e.g. {b}@k50"
                    ),
                }
            }
        };
        let num = |prefix: &str, what: &str| -> Result<f32> {
            base[prefix.len()..]
                .parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "bad mode `{s}`: `{}` is not a number; use {prefix}{what}",
                        &base[prefix.len()..]
                    )
                })
        };
        let (kind, tree, delta, lambda) = match base {
            "ar" => (DecodingArg::Ar, TreeChoice::Dynamic, 0.0, 1.0),
            "sd-dynamic" => (DecodingArg::Sd, TreeChoice::Dynamic, 0.0, 1.0),
            "sd-static" => (DecodingArg::Sd, TreeChoice::Static, 0.0, 1.0),
            b if b.starts_with("lantern++-") => {
                let l = num("lantern++-", "LAMBDA")?;
                if l < 1.0 {
                    bail!("bad mode `{s}`: lambda {l} must be >= 1 (1 = exact)");
                }
                (DecodingArg::LanternPp, TreeChoice::Static, 0.0, l)
            }
            b if b.starts_with("lantern-") => {
                let d = num("lantern-", "DELTA")?;
                if !(0.0..=1.0).contains(&d) {
                    bail!("bad mode `{s}`: delta {d} must be in [0, 1] (0 = exact)");
                }
                (DecodingArg::Lantern, TreeChoice::Dynamic, d, 1.0)
            }
            b => bail!("bad mode `{s}`: unknown mode `{b}`; {GRAMMAR}"),
        };
        if k.is_some() && !matches!(kind, DecodingArg::Lantern | DecodingArg::LanternPp) {
            bail!("bad mode `{s}`: @kK applies only to lantern-DELTA and lantern++-LAMBDA (`{base}` uses no neighbours)");
        }
        Ok(Self {
            kind,
            tree,
            delta,
            lambda,
            k,
            greedy,
            base: base.to_string(),
        })
    }
}

impl fmt::Display for BenchMode {
    /// The canonical spelling, e.g. `lantern++-2@k20/greedy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.base)?;
        if let Some(k) = self.k {
            write!(f, "@k{k}")?;
        }
        if self.greedy {
            write!(f, "/greedy")?;
        }
        Ok(())
    }
}

/// The full table of issue 6: AR, exact SD on both trees, LANTERN at four deltas and two extra
/// k, LANTERN++ at three lambdas and one extra k, and a greedy block.
pub fn default_modes() -> Vec<BenchMode> {
    [
        "ar",
        "sd-dynamic",
        "sd-static",
        "lantern-0.05",
        "lantern-0.1",
        "lantern-0.2",
        "lantern-0.4",
        "lantern-0.2@k20",
        "lantern-0.2@k200",
        "lantern++-2",
        "lantern++-3",
        "lantern++-5",
        "lantern++-2@k20",
        "ar/greedy",
        "sd-static/greedy",
        "lantern-0.2/greedy",
        "lantern++-2/greedy",
    ]
    .iter()
    .map(|s| s.parse().expect("built-in modes parse"))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> BenchMode {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        match s.parse::<BenchMode>() {
            Ok(m) => panic!("`{s}` parsed as {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_modes_k_and_greedy() {
        let m = p("lantern++-2@k200/greedy");
        assert_eq!(m.kind, DecodingArg::LanternPp);
        assert_eq!(m.tree, TreeChoice::Static);
        assert_eq!((m.lambda, m.k, m.greedy), (2.0, Some(200), true));
        assert_eq!(m.effective_k(100), Some(200));
        assert_eq!(m.to_string(), "lantern++-2@k200/greedy");

        let m = p("lantern-0.2@k50");
        assert_eq!(
            (m.kind, m.tree),
            (DecodingArg::Lantern, TreeChoice::Dynamic)
        );
        assert_eq!((m.delta, m.k, m.greedy), (0.2, Some(50), false));

        let m = p(" lantern-0.05 ");
        assert_eq!((m.delta, m.k), (0.05, None));
        assert_eq!(m.effective_k(100), Some(100));
        assert_eq!(m.to_string(), "lantern-0.05");

        let m = p("ar/greedy");
        assert!(m.is_ar() && m.greedy && m.effective_k(100).is_none());
        let m = p("sd-static/greedy");
        assert_eq!(
            (m.kind, m.tree, m.greedy),
            (DecodingArg::Sd, TreeChoice::Static, true)
        );
        assert_eq!(p("sd-dynamic").tree, TreeChoice::Dynamic);
        assert!(!p("sd-dynamic").is_relaxed());
    }

    #[test]
    fn rejects_bad_modes_in_one_line() {
        for (s, needle) in [
            ("lantern-0.2@50", "@kK"),
            ("lantern-0.2@k0", "@kK"),
            ("lantern-0.2@kx", "@kK"),
            ("lantern-0.2/sample", "/greedy"),
            ("ar@k20", "applies only"),
            ("sd-static@k20/greedy", "applies only"),
            ("lantern-abc", "not a number"),
            ("lantern-1.5", "[0, 1]"),
            ("lantern++-0.5", ">= 1"),
            ("lantern++-inf", "not a number"),
            ("medusa", "unknown mode"),
            ("", "unknown mode"),
        ] {
            let e = err(s);
            assert!(e.contains(needle), "`{s}`: {e}");
            assert!(!e.contains('\n'), "`{s}`: {e}");
        }
    }

    #[test]
    fn default_table_covers_the_issue() {
        let modes = default_modes();
        let names: Vec<String> = modes.iter().map(|m| m.to_string()).collect();
        for want in [
            "ar",
            "ar/greedy",
            "sd-dynamic",
            "sd-static",
            "lantern-0.4",
            "lantern++-5",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing");
        }
        assert!(modes
            .iter()
            .any(|m| m.greedy && m.kind == DecodingArg::LanternPp));
        assert!(modes.iter().filter(|m| m.k.is_some()).count() >= 3);
    }
}
