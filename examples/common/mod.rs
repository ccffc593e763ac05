//! The training loop of the train_cpu and train_cuda examples, written once over any
//! backend: a BatchNorm2d learns the affine map that turns normalised inputs into the
//! targets `2 * x_hat + 1`, by SGD on the mean squared error through `backward`.

use cuda_batchnorm::prelude::*;

/// Steps of plain SGD.
pub const STEPS: usize = 30;
/// Learning rate.
pub const LR: f32 = 0.5;

/// A batch of `shape` with a different mean and spread per channel, and its targets.
pub fn batch(shape: &Shape, step: usize) -> (Vec<f32>, Vec<f32>) {
    let (n, c, s) = (shape.n(), shape.c(), shape.spatial());
    let mut x = vec![0f32; shape.numel()];
    let mut target = vec![0f32; shape.numel()];
    let mut seed = 0x9e37_79b9u32.wrapping_mul(step as u32 + 1);
    for b in 0..n {
        for ch in 0..c {
            let values: Vec<f32> = (0..s)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
                })
                .collect();
            for (i, v) in values.into_iter().enumerate() {
                let o = shape.offset(b, ch, i);
                x[o] = 3.0 * ch as f32 + (1.0 + ch as f32) * v;
            }
        }
    }
    // targets from the batch's own statistics: 2 * (x - mean) / std + 1
    for ch in 0..c {
        let vals: Vec<f32> = (0..n)
            .flat_map(|b| (0..s).map(move |i| (b, i)))
            .map(|(b, i)| x[shape.offset(b, ch, i)])
            .collect();
        let m = vals.iter().sum::<f32>() / vals.len() as f32;
        let var = vals.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / vals.len() as f32;
        for b in 0..n {
            for i in 0..s {
                let o = shape.offset(b, ch, i);
                target[o] = 2.0 * (x[o] - m) / (var + 1e-5).sqrt() + 1.0;
            }
        }
    }
    (x, target)
}

/// Trains a BatchNorm2d on `backend` and returns its final weight and bias (they
/// approach 2 and 1) and the last loss.
pub fn train<B: Backend>(backend: B) -> Result<(Vec<f32>, Vec<f32>, f32)> {
    let shape = Shape::nchw(8, 3, 6, 6)?;
    let mut bn =
        cuda_batchnorm::BatchNorm::<2, B, f32>::new(backend, 3, BatchNormOptions::default())?;
    let mut loss = f32::NAN;
    for step in 0..STEPS {
        let (x, target) = batch(&shape, step);
        let xb = bn.backend().upload(&x)?;
        let yb = bn.forward(B::tensor(&xb), &shape)?;
        let y = bn.backend().to_host(&yb)?;
        // loss = mean((y - t)^2); dloss/dy = 2 (y - t) / numel
        let numel = shape.numel() as f32;
        loss = y
            .iter()
            .zip(&target)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / numel;
        let dy: Vec<f32> = y
            .iter()
            .zip(&target)
            .map(|(a, b)| 2.0 * (a - b) / numel)
            .collect();
        let dyb = bn.backend().upload(&dy)?;
        let g = bn.backward(B::tensor(&dyb), B::tensor(&xb), &shape)?;
        let (Some(gw), Some(gb)) = (g.weight, g.bias) else {
            return Err(BnError::Backward(
                "an affine module has parameter gradients",
            ));
        };
        let (gw, gb) = (bn.backend().to_host(&gw)?, bn.backend().to_host(&gb)?);
        let sd = bn.state_dict()?;
        let (Some(mut w), Some(mut b)) = (sd.weight, sd.bias) else {
            return Err(BnError::Backward("an affine module has weight and bias"));
        };
        for c in 0..3 {
            w[c] -= LR * gw[c];
            b[c] -= LR * gb[c];
        }
        // the optimiser's step: new values into the module's parameters
        bn.set_weight(&w)?;
        bn.set_bias(&b)?;
        if step % 10 == 0 || step == STEPS - 1 {
            println!("step {step:2}: loss {loss:.6}");
        }
    }
    let sd = bn.state_dict()?;
    Ok((
        sd.weight.unwrap_or_default(),
        sd.bias.unwrap_or_default(),
        loss,
    ))
}
