//! PyTorch weights from `.safetensors` files on the CPU backend: every BatchNorm layer of
//! a small torchvision-style CNN trained in PyTorch (tests/fixtures/cnn.safetensors)
//! reproduces PyTorch's eval outputs, in both layouts and every parameter type; the
//! stored dtype is converted; PyTorch's `load_state_dict` rules and sentences; a round
//! trip through the writer. tests/gpu.rs runs the layers through the CUDA modules.

mod common;

use common::cnn::{self, LAYERS};
use cuda_batchnorm::half::{bf16, f16};
use cuda_batchnorm::weights::{Weights, WeightsWriter};
use cuda_batchnorm::{
    cpu::{BatchNorm1d, BatchNorm2d},
    BatchNormOptions, Cpu, IncompatibleKeys, MemoryFormat,
};

#[test]
fn every_layer_of_the_cnn_reproduces_pytorch() {
    let (weights, io) = cnn::load();
    assert_eq!(weights.batchnorm_prefixes(), LAYERS.to_vec());
    let mut failures = Vec::new();
    for prefix in LAYERS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            for r in [
                cnn::check_layer::<Cpu, f32, f32>(Cpu, &weights, &io, prefix, format),
                cnn::check_layer::<Cpu, f64, f64>(Cpu, &weights, &io, prefix, format),
                cnn::check_layer::<Cpu, f16, f32>(Cpu, &weights, &io, prefix, format),
                cnn::check_layer::<Cpu, f16, f16>(Cpu, &weights, &io, prefix, format),
                cnn::check_layer::<Cpu, bf16, bf16>(Cpu, &weights, &io, prefix, format),
            ] {
                if let Err(e) = r {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_stored_dtype_is_converted() {
    let (f32_file, _) = cnn::load();
    let bf16_file = Weights::read(cnn::fixture("cnn_bf16.safetensors")).unwrap();
    // bf16 values stored by PyTorch, loaded into f32 and f64 modules: exactly the bf16
    // values; into a bf16 module: the same bits.
    let mut m32 = BatchNorm2d::<f32>::new(Cpu, 8, BatchNormOptions::default()).unwrap();
    m32.load_safetensors(&bf16_file, "bn1", true).unwrap();
    let mut m16 = BatchNorm2d::<bf16>::new(Cpu, 8, BatchNormOptions::default()).unwrap();
    m16.load_safetensors(&bf16_file, "bn1", true).unwrap();
    let sd32 = m32.state_dict().unwrap();
    let sd16 = m16.state_dict().unwrap();
    let widened: Vec<f32> = sd16
        .running_var
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert_eq!(sd32.running_var.as_ref().unwrap(), &widened);
    // f32 into f16: rounded to nearest
    let mut mh = BatchNorm2d::<f16>::new(Cpu, 8, BatchNormOptions::default()).unwrap();
    mh.load_safetensors(&f32_file, "bn1", true).unwrap();
    let want: Vec<f16> = f32_file
        .values::<f32>("bn1.running_mean")
        .unwrap()
        .unwrap()
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    assert_eq!(mh.state_dict().unwrap().running_mean.unwrap(), want);
    // the counter, an int64 scalar
    assert_eq!(f32_file.shape("bn1.num_batches_tracked"), Some(&[][..]));
    assert_eq!(m32.num_batches_tracked(), 5);
}

/// A copy of the fixture's `bn1` tensors with edits, under prefix `p`.
fn file_with(edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) -> Weights {
    let (w, _) = cnn::load();
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> =
        ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .map(|n| {
                let key = format!("net.bn1.{n}");
                let src = format!("bn1.{n}");
                (
                    key,
                    w.shape(&src).unwrap().to_vec(),
                    w.values::<f32>(&src).unwrap().unwrap(),
                )
            })
            .collect();
    edit(&mut t);
    let mut out = WeightsWriter::new();
    for (k, s, v) in &t {
        out.add(k, s, v).unwrap();
    }
    Weights::from_bytes(out.to_bytes().unwrap()).unwrap()
}

#[test]
fn load_state_dict_rules_and_sentences() {
    let fresh = || BatchNorm2d::<f32>::new(Cpu, 8, BatchNormOptions::default()).unwrap();
    // (PyTorch 2.15's messages for these cases, on the CPU, with the crate's [8] for
    // torch.Size([8]).)
    let f = file_with(|t| {
        t.retain(|(k, _, _)| !k.ends_with("running_var"));
        t.push(("net.bn1.foo".into(), vec![1], vec![0.0]));
        t[0] = ("net.bn1.weight".into(), vec![4], vec![1.0; 4]);
    });
    let mut m = fresh();
    let before = m.state_dict().unwrap();
    let e = m.load_safetensors(&f, "net.bn1", true).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Error(s) in loading state_dict for BatchNorm2d:\n\tMissing key(s) in state_dict: \
         \"net.bn1.running_var\". \n\tUnexpected key(s) in state_dict: \"net.bn1.foo\". \
         \n\tsize mismatch for net.bn1.weight: copying a param with shape [4] from checkpoint, \
         the shape in current model is [8]."
    );
    assert_eq!(m.state_dict().unwrap(), before, "nothing loaded");
    // not strict: missing and unexpected keys are returned, the rest is loaded
    let f = file_with(|t| {
        t.retain(|(k, _, _)| !k.ends_with(".bias"));
        t.push(("net.bn1.x".into(), vec![1], vec![0.0]));
    });
    let mut m = fresh();
    let keys = m.load_safetensors(&f, "net.bn1", false).unwrap();
    assert_eq!(
        keys,
        IncompatibleKeys {
            missing_keys: vec!["net.bn1.bias".into()],
            unexpected_keys: vec!["net.bn1.x".into()],
        }
    );
    let sd = m.state_dict().unwrap();
    assert_eq!(
        sd.bias, before.bias,
        "a missing key leaves the tensor alone"
    );
    assert_ne!(sd.running_var, before.running_var);
    // a size mismatch is an error even when not strict; so is a [1, 8] tensor
    let f = file_with(|t| t[3] = ("net.bn1.running_var".into(), vec![1, 8], vec![1.0; 8]));
    assert_eq!(
        fresh().load_safetensors(&f, "net.bn1", false).unwrap_err().to_string(),
        "Error(s) in loading state_dict for BatchNorm2d:\n\tsize mismatch for net.bn1.running_var: \
         copying a param with shape [1, 8] from checkpoint, the shape in current model is [8]."
    );
    // no num_batches_tracked (an old checkpoint): the count stays
    let mut m = fresh();
    m.forward(
        &[0.5; 16 * 8],
        &cuda_batchnorm::Shape::nchw(2, 8, 2, 4).unwrap(),
    )
    .unwrap();
    m.load_safetensors(&file_with(|_| {}), "net.bn1", true)
        .unwrap();
    assert_eq!(m.num_batches_tracked(), 1);
    // a module without running statistics: those keys are unexpected
    let opts = BatchNormOptions {
        track_running_stats: false,
        ..Default::default()
    };
    let mut m = BatchNorm2d::<f32>::new(Cpu, 8, opts).unwrap();
    let keys = m
        .load_safetensors(&file_with(|_| {}), "net.bn1", false)
        .unwrap();
    assert_eq!(
        keys.unexpected_keys,
        vec![
            "net.bn1.running_mean".to_string(),
            "net.bn1.running_var".to_string()
        ]
    );
    // an empty prefix: the layer's own keys at the top level, and anything else unexpected
    let (w, _) = cnn::load();
    let e = fresh()
        .load_safetensors(&w, "", true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Missing key(s) in state_dict: \"weight\", \"bias\""),
        "{e}"
    );
    assert!(e.contains("\"bn1.weight\""), "{e}");
}

#[test]
fn layers_round_trip_through_the_writer() {
    let (w, io) = cnn::load();
    let mut out = WeightsWriter::new();
    let mut head = BatchNorm1d::<f64>::new(Cpu, 10, BatchNormOptions::default()).unwrap();
    head.load_safetensors(&w, "bn_head", true).unwrap();
    out.add_module("model.bn_head", &head).unwrap();
    let mut stem = BatchNorm2d::<bf16, f32>::new(Cpu, 8, BatchNormOptions::default()).unwrap();
    stem.load_safetensors(&w, "bn1", true).unwrap();
    out.add_module("model.bn1", &stem).unwrap();
    assert!(out.add_module("model.bn1", &stem).is_err(), "a key twice");
    let dir = std::env::temp_dir().join(format!("cuda-batchnorm-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("round_trip.safetensors");
    out.write(&path).unwrap();
    let back = Weights::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        back.batchnorm_prefixes(),
        vec!["model.bn1", "model.bn_head"]
    );
    assert_eq!(back.shape("model.bn1.num_batches_tracked"), Some(&[][..]));
    let mut head2 = BatchNorm1d::<f64>::new(Cpu, 10, BatchNormOptions::default()).unwrap();
    head2
        .load_safetensors(&back, "model.bn_head", true)
        .unwrap();
    assert_eq!(head2.state_dict().unwrap(), head.state_dict().unwrap());
    let mut stem2 = BatchNorm2d::<bf16, f32>::new(Cpu, 8, BatchNormOptions::default()).unwrap();
    stem2.load_safetensors(&back, "model.bn1", true).unwrap();
    assert_eq!(stem2.state_dict().unwrap(), stem.state_dict().unwrap());
    // and the reloaded layer still reproduces PyTorch
    cnn::check_layer::<Cpu, f32, f32>(Cpu, &w, &io, "bn1", MemoryFormat::Contiguous).unwrap();
}

#[test]
fn bad_files_are_errors() {
    assert!(Weights::from_bytes(vec![1, 2, 3]).is_err());
    assert!(Weights::from_bytes(Vec::new()).is_err());
    let e = Weights::read("/nonexistent/x.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot read /nonexistent/x.safetensors"),
        "{e}"
    );
    let mut out = WeightsWriter::new();
    assert!(
        out.add("a", &[2, 2], &[1.0f32; 3]).is_err(),
        "shape and values disagree"
    );
}
