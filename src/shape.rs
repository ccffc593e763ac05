//! Shapes and memory formats.
//!
//! A [`Shape`] is the logical size of a batch-norm input, `(N, C, d1, d2, ...)` as
//! PyTorch writes it, plus where the channel sits in memory:
//!
//! * [`MemoryFormat::Contiguous`]: `N, C, d1, d2, ...` row-major (NCHW, NCDHW, NCL, NC);
//! * [`MemoryFormat::ChannelsLast`]: `N, d1, d2, ..., C` row-major (NHWC, NDHWC, NLC).
//!
//! Every kernel sees the shape as `(N, C, S)` with `S` the product of the dimensions
//! after C, so any rank from 2 up works; the modules restrict ranks as PyTorch's do.
//! Shapes of rank 0 and 1 exist too, so that validation can refuse them with the
//! sentence PyTorch gives for each call (`expected 2D or 3D input (got 1D input)` from
//! a `BatchNorm1d`, PyTorch's own checks from the functional API); nothing runs on them.

use crate::error::{BnError, Result};

/// Most dimensions a shape may have.
pub const MAX_DIMS: usize = 8;

/// Where the channel dimension sits in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum MemoryFormat {
    /// Channel second: NCHW (PyTorch's `torch.contiguous_format`).
    #[default]
    Contiguous,
    /// Channel last: NHWC / NDHWC (PyTorch's `channels_last` / `channels_last_3d`).
    ChannelsLast,
}

impl MemoryFormat {
    /// `nchw` or `nhwc`, the names bnbench uses.
    pub const fn name(self) -> &'static str {
        match self {
            MemoryFormat::Contiguous => "nchw",
            MemoryFormat::ChannelsLast => "nhwc",
        }
    }

    /// Parses `nchw`/`contiguous` or `nhwc`/`channels_last`.
    pub fn parse(s: &str) -> Option<MemoryFormat> {
        match s {
            "nchw" | "contiguous" => Some(MemoryFormat::Contiguous),
            "nhwc" | "channels_last" => Some(MemoryFormat::ChannelsLast),
            _ => None,
        }
    }
}

/// The logical size of a batch-norm input and its memory format.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; MAX_DIMS],
    rank: usize,
    format: MemoryFormat,
    numel: usize,
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}", self.dims(), self.format.name())
    }
}

impl Shape {
    /// A shape from PyTorch-order sizes `(N, C, ...)`, of any rank up to [`MAX_DIMS`]
    /// (validation refuses ranks below 2 later, in the words of the call that gets
    /// them). Fails for more than [`MAX_DIMS`] dimensions, or sizes whose product,
    /// zeros left out, exceeds `isize::MAX` (so an empty shape cannot hide sizes nothing
    /// could address).
    pub fn new(dims: &[usize], format: MemoryFormat) -> Result<Shape> {
        if dims.len() > MAX_DIMS {
            return Err(BnError::InputTooManyDims {
                max: MAX_DIMS,
                size: dims.to_vec(),
            });
        }
        // The product of the non-zero sizes bounds every partial product (spatial,
        // per_channel), so none of them can overflow, not even for empty shapes.
        let fits = |skip_zeros: bool| {
            dims.iter()
                .map(|&d| if skip_zeros { d.max(1) } else { d })
                .try_fold(1usize, |acc, d| acc.checked_mul(d))
                .filter(|&n| n <= isize::MAX as usize)
        };
        let (Some(numel), Some(_)) = (fits(false), fits(true)) else {
            return Err(BnError::InputTooLarge {
                size: dims.to_vec(),
            });
        };
        let mut a = [0usize; MAX_DIMS];
        a[..dims.len()].copy_from_slice(dims);
        Ok(Shape {
            dims: a,
            rank: dims.len(),
            format,
            numel,
        })
    }

    /// `(N, C)`.
    pub fn nc(n: usize, c: usize) -> Result<Shape> {
        Shape::new(&[n, c], MemoryFormat::Contiguous)
    }

    /// `(N, C, H, W)` stored NCHW.
    pub fn nchw(n: usize, c: usize, h: usize, w: usize) -> Result<Shape> {
        Shape::new(&[n, c, h, w], MemoryFormat::Contiguous)
    }

    /// `(N, C, H, W)` stored NHWC.
    pub fn nhwc(n: usize, c: usize, h: usize, w: usize) -> Result<Shape> {
        Shape::new(&[n, c, h, w], MemoryFormat::ChannelsLast)
    }

    /// Sizes in PyTorch order `(N, C, ...)`.
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank]
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The memory format.
    pub fn format(&self) -> MemoryFormat {
        self.format
    }

    /// The same sizes in another memory format.
    pub fn with_format(&self, format: MemoryFormat) -> Shape {
        Shape { format, ..*self }
    }

    /// Batch size N (1 for a rank-0 shape).
    pub fn n(&self) -> usize {
        if self.rank == 0 {
            1
        } else {
            self.dims[0]
        }
    }

    /// Channels C (0 below rank 2, which is what PyTorch's length checks compare
    /// against there).
    pub fn c(&self) -> usize {
        if self.rank < 2 {
            0
        } else {
            self.dims[1]
        }
    }

    /// Product of the dimensions after C (1 for `(N, C)` and below).
    pub fn spatial(&self) -> usize {
        self.dims[2.min(self.rank)..self.rank].iter().product()
    }

    /// Values per channel, `N * S`.
    pub fn per_channel(&self) -> usize {
        self.n() * self.spatial()
    }

    /// Total elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Whether the channel is the fastest-moving index in memory. True for channels-last,
    /// and for any shape with `S == 1`, where both formats are the same bytes.
    pub fn channel_innermost(&self) -> bool {
        self.format == MemoryFormat::ChannelsLast || self.spatial() == 1
    }

    /// Memory offset of the element at batch `n`, channel `c`, flattened spatial `s`
    /// (meaningful for `n < N`, `c < C`, `s < S`, where it is below `numel()`; other
    /// arguments give an unspecified value, never a panic).
    pub fn offset(&self, n: usize, c: usize, s: usize) -> usize {
        let (cc, ss) = (self.c(), self.spatial());
        match self.format {
            MemoryFormat::Contiguous => n
                .wrapping_mul(cc)
                .wrapping_add(c)
                .wrapping_mul(ss)
                .wrapping_add(s),
            MemoryFormat::ChannelsLast => n
                .wrapping_mul(ss)
                .wrapping_add(s)
                .wrapping_mul(cc)
                .wrapping_add(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_the_format() {
        let a = Shape::nchw(2, 3, 4, 5).unwrap();
        let b = a.with_format(MemoryFormat::ChannelsLast);
        assert_eq!(a.offset(1, 2, 7), (3 + 2) * 20 + 7);
        assert_eq!(b.offset(1, 2, 7), (20 + 7) * 3 + 2);
        assert_eq!(a.per_channel(), 40);
        assert!(!a.channel_innermost());
        assert!(b.channel_innermost());
        assert!(Shape::nc(4, 3).unwrap().channel_innermost());
    }

    #[test]
    fn bad_ranks_and_overflow_are_errors() {
        let one = Shape::new(&[3], MemoryFormat::Contiguous).unwrap();
        assert_eq!(
            (one.n(), one.c(), one.spatial(), one.per_channel()),
            (3, 0, 1, 3)
        );
        let zero = Shape::new(&[], MemoryFormat::Contiguous).unwrap();
        assert_eq!(
            (zero.numel(), zero.n(), zero.c(), zero.rank()),
            (1, 1, 0, 0)
        );
        assert!(matches!(
            Shape::new(&[1; 9], MemoryFormat::Contiguous),
            Err(BnError::InputTooManyDims { max: 8, .. })
        ));
        assert!(matches!(
            Shape::new(&[usize::MAX, 2], MemoryFormat::Contiguous),
            Err(BnError::InputTooLarge { .. })
        ));
        let empty = Shape::new(&[0, 3, 2], MemoryFormat::Contiguous).unwrap();
        assert_eq!(empty.numel(), 0);
        // Empty, but spatial() would overflow: refused rather than unaddressable.
        assert!(matches!(
            Shape::new(&[0, 3, 1 << 40, 1 << 40], MemoryFormat::Contiguous),
            Err(BnError::InputTooLarge { .. })
        ));
        let wide = Shape::new(&[0, 3, 1 << 20, 1 << 20], MemoryFormat::Contiguous).unwrap();
        assert_eq!(
            (wide.numel(), wide.spatial(), wide.per_channel()),
            (0, 1 << 40, 0)
        );
    }
}
