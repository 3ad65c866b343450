//! Diagnostics of the speculative loop's time. `LANTERN_LOOP_SYNC=1` waits for the device at
//! the end of every phase ([`LoopProfile::end_phase`]), so that the draft / verify / accept
//! timers of `DecodeStats` hold each phase's GPU time too.
//!
//! `LANTERN_LOOP_PROFILE=1` is a finer phase profile: the loop marks
//! the end of each of its segments (building a level's inputs, the drafter forward, the pick
//! transfer, the target forward, acceptance, compaction, ...); every mark waits for the device
//! and charges the time since the previous mark to the segment, so that host work and GPU work
//! are told apart (at the price of all overlap). At the end of a generation the table of
//! milliseconds per verification step goes to stderr. Off, a mark costs a branch.
//!
//! Code below the loop (the fixed-shape steps, the models' input building) marks its own
//! segments with [`mark_here`], which charges the profile of the loop running on this thread.
use crate::Result;
use candle_core::Device;
use std::cell::RefCell;
use std::fmt::Write;
use std::rc::Rc;
use std::time::Instant;

thread_local! {
    /// The profile of the loop running on this thread, while it is on.
    static CURRENT: RefCell<Option<(Device, Rc<RefCell<Inner>>)>> = const { RefCell::new(None) };
    /// Phase syncs asked for by code on this thread (the loop bench), besides the variable.
    static SYNC_PHASES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, loops started on this thread wait for the device at every phase end, as
/// `LANTERN_LOOP_SYNC=1` does (the loop bench: with asynchronous graph replays, a phase's
/// timer would otherwise end before its GPU work and the next phase's first read would pay
/// for it). Made by [`sync_phases_on_this_thread`]; dropping it restores the previous setting.
pub struct PhaseSyncs {
    was: bool,
}

/// Phase syncs for loops on this thread until the returned guard is dropped.
pub fn sync_phases_on_this_thread() -> PhaseSyncs {
    PhaseSyncs {
        was: SYNC_PHASES.with(|c| c.replace(true)),
    }
}

impl Drop for PhaseSyncs {
    fn drop(&mut self) {
        SYNC_PHASES.with(|c| c.set(self.was));
    }
}

/// Ends a segment of the profile of the loop running on this thread (see
/// [`LoopProfile::mark`]); nothing when there is none or it is off.
pub fn mark_here(name: &'static str) -> Result<()> {
    let cur = CURRENT.with(|c| c.borrow().clone());
    match cur {
        Some((dev, inner)) => charge(&dev, &inner, name),
        None => Ok(()),
    }
}

/// Waits for `dev` and charges the time since the last mark to `name`.
fn charge(dev: &Device, inner: &RefCell<Inner>, name: &'static str) -> Result<()> {
    dev.synchronize()?;
    let mut p = inner.borrow_mut();
    let now = Instant::now();
    let dt = (now - p.last).as_secs_f64();
    p.last = now;
    match p.acc.iter_mut().find(|(n, _, _)| *n == name) {
        Some(e) => {
            e.1 += dt;
            e.2 += 1;
        }
        None => p.acc.push((name, dt, 1)),
    }
    Ok(())
}

struct Inner {
    last: Instant,
    /// Segment name, seconds, marks; in first-mark order.
    acc: Vec<(&'static str, f64, usize)>,
    /// CUDA graphs captured on this thread before the profile started.
    captures_at_start: usize,
}

/// Segment timers shared by the loop and its drafting levels (see the module docs).
pub struct LoopProfile {
    dev: Device,
    /// Wait for the device at every phase end.
    sync_phases: bool,
    inner: Option<Rc<RefCell<Inner>>>,
}

impl LoopProfile {
    /// Segment marks on when `LANTERN_LOOP_PROFILE=1`, phase syncs when `LANTERN_LOOP_SYNC=1`
    /// or [`sync_phases_on_this_thread`].
    pub fn from_env(dev: &Device) -> Self {
        let set = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
        let mut p = Self::new(set("LANTERN_LOOP_PROFILE"), dev);
        p.sync_phases = set("LANTERN_LOOP_SYNC") || SYNC_PHASES.with(|c| c.get());
        p
    }

    /// A profile that is on or off (no phase syncs).
    /// While on, it is also the profile [`mark_here`] charges on this thread.
    pub fn new(on: bool, dev: &Device) -> Self {
        let inner = on.then(|| {
            Rc::new(RefCell::new(Inner {
                last: Instant::now(),
                acc: Vec::new(),
                captures_at_start: crate::decode::graph_step::captures_on_this_thread(),
            }))
        });
        if let Some(i) = &inner {
            CURRENT.with(|c| *c.borrow_mut() = Some((dev.clone(), i.clone())));
        }
        Self {
            dev: dev.clone(),
            sync_phases: false,
            inner,
        }
    }

    /// Ends a loop phase (drafting, verification, acceptance): waits for the device when
    /// `LANTERN_LOOP_SYNC=1`.
    pub fn end_phase(&self) -> Result<()> {
        if self.sync_phases {
            self.dev.synchronize()?;
        }
        Ok(())
    }

    /// Whether marks are recorded.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Ends a segment: waits for the device and charges the time since the last mark to
    /// `name`.
    pub fn mark(&self, name: &'static str) -> Result<()> {
        match &self.inner {
            Some(inner) => charge(&self.dev, inner, name),
            None => Ok(()),
        }
    }

    /// Restarts the clock without charging anything (after work that is not profiled).
    pub fn restart(&self) -> Result<()> {
        if let Some(inner) = &self.inner {
            self.dev.synchronize()?;
            inner.borrow_mut().last = Instant::now();
        }
        Ok(())
    }

    /// The table of every segment: ms per step (over `steps` verification steps), marks per
    /// step, share of the profiled time.
    pub fn report(&self, steps: usize) -> String {
        let Some(inner) = &self.inner else {
            return String::new();
        };
        let p = inner.borrow();
        let total: f64 = p.acc.iter().map(|e| e.1).sum();
        let per = 1e3 / steps.max(1) as f64;
        let captured = crate::decode::graph_step::captures_on_this_thread() - p.captures_at_start;
        let mut out = format!(
            "loop profile ({steps} steps, device synchronised at every mark, {captured} CUDA graphs captured)\n| segment | ms/step | marks/step | share |\n|---|---:|---:|---:|\n"
        );
        for (name, secs, n) in &p.acc {
            let _ = writeln!(
                out,
                "| {name} | {:.3} | {:.1} | {:.1}% |",
                secs * per,
                *n as f64 / steps.max(1) as f64,
                100.0 * secs / total.max(1e-12)
            );
        }
        let _ = writeln!(out, "| total | {:.3} | | |", total * per);
        out
    }
}

impl Drop for LoopProfile {
    fn drop(&mut self) {
        if let Some(mine) = &self.inner {
            CURRENT.with(|c| {
                let mut c = c.borrow_mut();
                if c.as_ref().is_some_and(|(_, i)| Rc::ptr_eq(i, mine)) {
                    *c = None;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_charge_segments_in_order_and_off_records_nothing() -> Result<()> {
        let p = LoopProfile::new(true, &Device::Cpu);
        p.mark("a")?;
        std::thread::sleep(std::time::Duration::from_millis(5));
        p.mark("b")?;
        p.mark("a")?;
        let r = p.report(2);
        let a = r.find("| a |").expect("a listed");
        let b = r.find("| b |").expect("b listed");
        assert!(a < b, "{r}");
        // b holds the sleep: at least 5 ms over 2 steps
        let line = r.lines().find(|l| l.starts_with("| b |")).expect("b line");
        let ms: f64 = line.split('|').nth(2).unwrap().trim().parse().unwrap();
        assert!(ms >= 2.5, "{r}");
        assert!(r.contains("| a | ") && r.contains("| 1.0 |"), "{r}");
        // code below the loop charges the running profile
        mark_here("c")?;
        assert!(p.report(1).contains("| c |"));
        drop(p);
        mark_here("d")?; // no profile: nothing to charge, no error
        let off = LoopProfile::new(false, &Device::Cpu);
        off.mark("a")?;
        mark_here("a")?;
        assert!(!off.is_on() && off.report(1).is_empty());
        Ok(())
    }
}
