//! Adapters for other crates' tensors (each behind its own cargo feature).

#[cfg(feature = "candle")]
pub mod candle;
