//! The timing loop, written against a small trait so that its order of operations is
//! tested without a GPU ([`crate::gpu`] implements it with CUDA events).
//!
//! Per run: flush L2 (untimed), then `start`, the op, `end`. Warm-up runs flush and run
//! the op without events. After the last run, one wait, then every run's time.

use crate::metrics;

/// Median and fastest repetition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Median, µs.
    pub median_us: f64,
    /// Fastest, µs.
    pub min_us: f64,
}

/// What the timing loop needs from a device.
pub trait Clock {
    /// Queues the L2 flush.
    fn flush(&mut self) -> Result<(), String>;
    /// Queues the start marker of timed run `i`.
    fn start(&mut self, i: usize) -> Result<(), String>;
    /// Queues the end marker of timed run `i`.
    fn end(&mut self, i: usize) -> Result<(), String>;
    /// Waits for the queued work; returns the µs between the markers of runs `0..reps`.
    fn finish(&mut self, reps: usize) -> Result<Vec<f64>, String>;
}

/// Times `op`: `warmup` untimed runs, then `reps` timed runs, each after a flush.
pub fn run(
    clock: &mut impl Clock,
    warmup: usize,
    reps: usize,
    mut op: impl FnMut() -> Result<(), String>,
) -> Result<Timing, String> {
    for _ in 0..warmup {
        clock.flush()?;
        op()?;
    }
    for i in 0..reps {
        clock.flush()?;
        clock.start(i)?;
        op()?;
        clock.end(i)?;
    }
    let us = clock.finish(reps)?;
    let median_us = metrics::median(&us).ok_or("no valid timings")?;
    let min_us = us.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Timing { median_us, min_us })
}

/// How to fill a buffer of `numel` elements whose first `first` hold a pattern by
/// copying it onto itself: `(filled, n)` copies elements `0..n` to `filled..filled + n`,
/// doubling the filled prefix each time.
pub fn doubling_copies(first: usize, numel: usize) -> Vec<(usize, usize)> {
    let mut plan = Vec::new();
    let mut filled = first.min(numel);
    if filled == 0 {
        return plan;
    }
    while filled < numel {
        let n = filled.min(numel - filled);
        plan.push((filled, n));
        filled += n;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tile;

    #[derive(Default)]
    struct Fake {
        log: Vec<String>,
        times: Vec<f64>,
    }

    impl Clock for Fake {
        fn flush(&mut self) -> Result<(), String> {
            self.log.push("flush".into());
            Ok(())
        }
        fn start(&mut self, i: usize) -> Result<(), String> {
            self.log.push(format!("start{i}"));
            Ok(())
        }
        fn end(&mut self, i: usize) -> Result<(), String> {
            self.log.push(format!("end{i}"));
            Ok(())
        }
        fn finish(&mut self, reps: usize) -> Result<Vec<f64>, String> {
            self.log.push("finish".into());
            Ok(self.times[..reps].to_vec())
        }
    }

    #[test]
    fn flush_is_outside_the_timed_region() {
        let mut clock = Fake {
            times: vec![5.0, 1.0, 3.0],
            ..Fake::default()
        };
        let mut ops = 0;
        let t = run(&mut clock, 2, 3, || {
            ops += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(ops, 5);
        let expected = "flush flush flush start0 end0 flush start1 end1 flush start2 end2 finish";
        // The op runs between the markers (not logged): check the markers' order.
        assert_eq!(clock.log.join(" "), expected);
        assert_eq!(
            t,
            Timing {
                median_us: 3.0,
                min_us: 1.0
            }
        );
    }

    #[test]
    fn errors_stop_the_loop() {
        let mut clock = Fake {
            times: vec![1.0; 4],
            ..Fake::default()
        };
        let mut n = 0;
        let r = run(&mut clock, 0, 4, || {
            n += 1;
            if n == 2 {
                Err("boom".into())
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err("boom".to_string()));
        assert!(!clock.log.contains(&"finish".to_string()));
        let mut clock = Fake {
            times: vec![f64::NAN],
            ..Fake::default()
        };
        assert!(run(&mut clock, 0, 1, || Ok(())).is_err());
    }

    #[test]
    fn doubling_fills_exactly() {
        for (first, numel) in [
            (3, 7),
            (5, 5),
            (5, 3),
            (1, 1000),
            (1_000_003, 25_690_112),
            (4, 64),
        ] {
            let pattern: Vec<usize> = (0..first).collect();
            let mut buf = vec![usize::MAX; numel];
            let k = first.min(numel);
            buf[..k].copy_from_slice(&pattern[..k]);
            for (filled, n) in doubling_copies(first, numel) {
                assert!(filled + n <= numel && n <= filled);
                let (done, rest) = buf.split_at_mut(filled);
                rest[..n].copy_from_slice(&done[..n]);
            }
            assert!(buf == tile(&pattern, numel), "{first} {numel}");
        }
        assert_eq!(
            doubling_copies(4, 64),
            vec![(4, 4), (8, 8), (16, 16), (32, 32)]
        );
        assert!(doubling_copies(0, 10).is_empty());
    }
}
