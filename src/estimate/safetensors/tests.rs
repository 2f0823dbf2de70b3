use super::config::HfConfig;
use super::*;

/// Builds a safetensors file: the header JSON for `tensors` (name, dtype, shape), then zeroed data.
fn build(tensors: &[(&str, &str, &[u64])], metadata: Option<&str>) -> Vec<u8> {
    let mut entries = Vec::new();
    if let Some(m) = metadata {
        entries.push(format!("\"__metadata__\":{m}"));
    }
    let mut off = 0u64;
    for (name, dtype, shape) in tensors {
        let bytes = shape.iter().product::<u64>() * dtype_bits(dtype).unwrap() / 8;
        entries.push(format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{off},{}]}}",
            off + bytes
        ));
        off += bytes;
    }
    let json = format!("{{{}}}", entries.join(","));
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.resize(out.len() + off as usize, 0);
    out
}

fn sample() -> Vec<u8> {
    build(
        &[
            ("model.embed_tokens.weight", "BF16", &[10, 64]),
            ("model.layers.0.self_attn.q_proj.weight", "F16", &[64, 64]),
            ("model.norm.weight", "F32", &[64]),
        ],
        Some(r#"{"format":"pt"}"#),
    )
}

fn parse_all(b: &[u8]) -> Result<SafetensorsFile, SafetensorsError> {
    parse(b, b.len() as u64)
}

#[test]
fn reads_tensors_and_metadata() {
    let b = sample();
    let f = parse_all(&b).unwrap();
    assert_eq!(f.metadata, vec![("format".into(), "pt".into())]);
    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.norm.weight"
        ]
    );
    assert_eq!(f.tensors[0].shape, vec![10, 64]);
    assert_eq!(f.tensors[0].bytes, 1280);
    assert_eq!(f.tensors[1].data_offsets, (1280, 1280 + 8192));
    assert_eq!(f.tensor_bytes(), 1280 + 8192 + 256);
    assert_eq!(8 + f.header_len + f.tensor_bytes(), b.len() as u64);
}

#[test]
fn lying_headers_name_the_offset() {
    // Length beyond the file, beyond the cap, too short to hold JSON.
    let mut b = sample();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = parse_all(&b).unwrap_err();
    assert_eq!(e.offset, 0);
    assert!(e.expected.contains("header length"), "{e}");
    assert!(parse_all(&[1, 0, 0, 0, 0, 0, 0, 0, b'{']).is_err());
    // data_offsets past the data, a span that disagrees with the shape, unknown dtype.
    let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,1000]}}"#;
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(json.as_bytes());
    b.resize(b.len() + 16, 0);
    let e = parse_all(&b).unwrap_err();
    assert_eq!(e.offset, 9, "{e}");
    assert!(e.expected.contains("within the 16 data bytes"), "{e}");
    let bad = |json: &str| {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.resize(b.len() + 64, 0);
        parse_all(&b).unwrap_err().to_string()
    };
    assert!(
        bad(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#).contains("spanning 16")
    );
    assert!(
        bad(r#"{"a":{"dtype":"Q9","shape":[4],"data_offsets":[0,8]}}"#).contains("known dtype")
    );
    assert!(bad(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#).contains("shape"));
    assert!(
        bad(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#)
            .contains("64 bits")
    );
    assert!(
        bad(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#).contains("begin <= end")
    );
    assert!(bad(r#"{"__metadata__":{"k":1}}"#).contains("__metadata__.k"));
    assert!(bad(r#"[1,2]"#).contains("JSON object"));
    // "nope" starts at header byte 8 (file byte 16); serde stops at its second letter.
    let e = bad("{\"a\":\n  nope}");
    assert!(e.contains("safetensors byte 17"), "{e}");
}

/// A tiny deterministic generator (no dev-dependency for randomness).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
}

#[test]
fn fuzz_truncation_mutation_and_random_bytes_never_panic() {
    let b = sample();
    let header_end = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    // Truncated anywhere inside the header (file_len follows the cut): always an error.
    for cut in 0..header_end {
        assert!(parse_all(&b[..cut]).is_err(), "cut at {cut}");
    }
    // Every header byte set to 0xFF (never valid UTF-8 JSON, a huge length): an error; set to
    // other values: whatever it gives, no panic.
    for i in 0..header_end {
        let mut m = b.clone();
        m[i] = 0xFF;
        assert!(parse_all(&m).is_err(), "0xFF at {i}");
        for v in [
            0u8,
            b'0',
            b'9',
            b'"',
            b'{',
            b']',
            b',',
            m[i].wrapping_add(1),
        ] {
            let mut m = b.clone();
            m[i] = v;
            let _ = parse_all(&m);
        }
    }
    // Random bytes, with a random or a plausible length prefix.
    let mut rng = Lcg(7);
    for round in 0..2000 {
        let len = 1 + (rng.next() as usize) * 2;
        let mut r: Vec<u8> = (0..len).map(|_| rng.next()).collect();
        if round % 2 == 0 && len > 8 {
            r[..8].copy_from_slice(&((len - 8) as u64).to_le_bytes());
        }
        assert!(parse_all(&r).is_err(), "round {round}");
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hbm-st-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn open_reads_only_the_header_and_sharded_index() {
    let d = tmpdir("shard");
    let a = build(&[("x.weight", "F16", &[8, 8])], None);
    let b = build(
        &[("y.weight", "F32", &[8]), ("z.weight", "I64", &[2])],
        None,
    );
    std::fs::write(d.join("model-00001-of-00002.safetensors"), &a).unwrap();
    std::fs::write(d.join("model-00002-of-00002.safetensors"), &b).unwrap();
    let index = d.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"metadata":{"total_size":176},"weight_map":{
            "x.weight":"model-00001-of-00002.safetensors",
            "y.weight":"model-00002-of-00002.safetensors",
            "z.weight":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let shards = open_index(&index).unwrap();
    assert_eq!(shards.len(), 2);
    let total: u64 = shards.iter().map(|(_, f)| f.tensor_bytes()).sum();
    assert_eq!(total, 128 + 32 + 16);
    // A map that names a tensor its shard lacks, or a path outside the folder.
    std::fs::write(
        &index,
        r#"{"weight_map":{"q.weight":"model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    assert!(open_index(&index).unwrap_err().contains("does not hold it"));
    std::fs::write(&index, r#"{"weight_map":{"x.weight":"../etc/passwd"}}"#).unwrap();
    assert!(open_index(&index).unwrap_err().contains("beside the index"));
    std::fs::write(
        &index,
        r#"{"weight_map":{"x.weight":"missing.safetensors"}}"#,
    )
    .unwrap();
    assert!(open_index(&index)
        .unwrap_err()
        .contains("missing.safetensors"));
    std::fs::write(&index, "{\"weight_map\": [").unwrap();
    assert!(open_index(&index).unwrap_err().contains("expected JSON"));
    // A file that says its header is longer than it is.
    let short = d.join("short.safetensors");
    std::fs::write(&short, &a[..20]).unwrap();
    assert!(open(&short).unwrap_err().contains("header length"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn config_json_gives_the_architecture() {
    let v: Value = serde_json::from_str(
        r#"{"model_type":"mistral","num_hidden_layers":32,"hidden_size":4096,
            "num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":32768,
            "sliding_window":4096,"vocab_size":32000,"torch_dtype":"bfloat16"}"#,
    )
    .unwrap();
    let c = HfConfig::from_json(&v).unwrap();
    assert_eq!(c.vocab_size, Some(32000));
    let h = c.hparams().unwrap();
    assert_eq!((h.n_layer, h.n_embd, h.head_dim_k), (32, 4096, 128));
    assert_eq!(h.n_head_kv, vec![8; 32]);
    // llama.cpp loads Mistral as the llama architecture and ignores its window.
    assert_eq!((h.n_swa, h.swa_layers[31]), (0, false));
    assert_eq!(h.n_ctx_train, 32768);
    // Qwen2 switches its window off; Gemma-2 alternates; layer_types decides when given.
    let qwen: Value = serde_json::from_str(
        r#"{"model_type":"qwen2","num_hidden_layers":2,"hidden_size":64,"num_attention_heads":4,
            "sliding_window":131072,"use_sliding_window":false}"#,
    )
    .unwrap();
    assert_eq!(
        HfConfig::from_json(&qwen).unwrap().hparams().unwrap().n_swa,
        0
    );
    let gemma: Value = serde_json::from_str(
        r#"{"text_config":{"model_type":"gemma2","num_hidden_layers":4,"hidden_size":64,
            "num_attention_heads":4,"head_dim":256,"sliding_window":4096}}"#,
    )
    .unwrap();
    let g = HfConfig::from_json(&gemma).unwrap().hparams().unwrap();
    assert_eq!(g.swa_layers, vec![true, false, true, false]);
    assert_eq!(g.head_dim_k, 256);
    let lt: Value = serde_json::from_str(
        r#"{"num_hidden_layers":2,"hidden_size":64,"num_attention_heads":4,"sliding_window":8,
            "layer_types":["full_attention","sliding_attention"]}"#,
    )
    .unwrap();
    assert_eq!(
        HfConfig::from_json(&lt)
            .unwrap()
            .hparams()
            .unwrap()
            .swa_layers,
        vec![false, true]
    );
    let missing: Value = serde_json::from_str(r#"{"hidden_size":64}"#).unwrap();
    let e = HfConfig::from_json(&missing)
        .unwrap()
        .hparams()
        .unwrap_err();
    assert!(e.contains("num_hidden_layers"), "{e}");
    let wrong: Value = serde_json::from_str(r#"{"num_hidden_layers":"x"}"#).unwrap();
    assert!(HfConfig::from_json(&wrong).is_err());
}
