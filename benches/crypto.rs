//! `cargo bench --bench crypto`: AES-256-XTS candidates on 4 KiB data units, one core, beside
//! `openssl speed -evp aes-256-xts` in the same run; and sha256 on 512 KiB chunks beside
//! `openssl speed -evp sha256`.
//!
//! Prints a human table and one `BENCH <name> <value> <unit>` line per figure.

use std::process::Command;
use std::time::{Duration, Instant};

use aes::cipher::KeyInit;
use aes::Aes256;
use blockfleet_keys::xts::{Xts, XtsKey, DATA_UNIT};
use blockfleet_snapshot_format::ChunkHash;
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;

const RUN: Duration = Duration::from_secs(2);

/// Runs `f` over a `len`-byte buffer for about RUN; returns GB/s (10^9 bytes per second).
fn measure(len: usize, mut f: impl FnMut(&mut [u8], u64)) -> f64 {
    let mut buf: Vec<u8> = (0..len).map(|i| i as u8).collect();
    // Warm up: caches, frequency, lazy CPU-feature detection.
    for i in 0..1000 {
        f(&mut buf, i);
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        for _ in 0..256 {
            f(&mut buf, n);
            n += 1;
        }
    }
    std::hint::black_box(&buf);
    (n as f64 * len as f64) / start.elapsed().as_secs_f64() / 1e9
}

/// `openssl speed` for one algorithm at one block size, in GB/s; None if openssl is missing.
fn openssl_speed(args: &[&str], bytes: usize) -> Option<f64> {
    let out = Command::new("openssl")
        .arg("speed")
        .args(["-seconds", "3", "-bytes", &bytes.to_string()])
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "<ALGO> <n>k" where n is thousands of bytes per second.
    let last = text.lines().rev().find(|l| l.trim_end().ends_with('k'))?;
    let k: f64 = last
        .split_whitespace()
        .last()?
        .trim_end_matches('k')
        .parse()
        .ok()?;
    Some(k * 1000.0 / 1e9)
}

fn report(name: &str, label: &str, gbps: f64, reference: Option<f64>) {
    let vs = reference.map_or(String::new(), |r| {
        format!("  ({:.0}% of openssl speed)", 100.0 * gbps / r)
    });
    println!("{label:<48} {gbps:>6.2} GB/s{vs}");
    println!("BENCH {name} {gbps:.2} GB/s");
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run a short smoke pass.
    if !std::env::args().any(|a| a == "--bench") {
        println!("crypto bench: run with `cargo bench --bench crypto`");
        return;
    }
    let key_bytes: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let key = XtsKey::from_bytes(&key_bytes).expect("distinct halves");
    println!("AES-256-XTS, 4096-byte data units, one core");

    let ref_enc = openssl_speed(&["-evp", "aes-256-xts"], DATA_UNIT);
    let ref_dec = openssl_speed(&["-decrypt", "-evp", "aes-256-xts"], DATA_UNIT);
    match (ref_enc, ref_dec) {
        (Some(e), Some(d)) => {
            report(
                "xts_encrypt_4k_openssl_speed",
                "openssl speed -evp aes-256-xts (encrypt)",
                e,
                None,
            );
            report(
                "xts_decrypt_4k_openssl_speed",
                "openssl speed -evp aes-256-xts (decrypt)",
                d,
                None,
            );
        }
        _ => println!("openssl speed: not available (install openssl)"),
    }

    let xts = Xts::new(&key);
    let enc = measure(DATA_UNIT, |b, n| xts.encrypt(b, n).expect("aligned"));
    report(
        "xts_encrypt_4k",
        "blockfleet Xts (aes crate, lane-batched) encrypt",
        enc,
        ref_enc,
    );
    let dec = measure(DATA_UNIT, |b, n| xts.decrypt(b, n).expect("aligned"));
    report(
        "xts_decrypt_4k",
        "blockfleet Xts (aes crate, lane-batched) decrypt",
        dec,
        ref_dec,
    );

    // The block cipher alone (ECB over a unit): the ceiling for any XTS over the aes crate.
    let ecb = Aes256::new_from_slice(&key_bytes[..32]).expect("key");
    let e = measure(DATA_UNIT, |b, _| {
        let (blocks, _) = aes::Block::slice_as_chunks_mut(b);
        aes::cipher::BlockCipherEncrypt::encrypt_blocks(&ecb, blocks);
    });
    report(
        "aes256_ecb_4k_aes_crate",
        "aes crate encrypt_blocks alone (no XTS), ceiling",
        e,
        ref_enc,
    );

    let xm = xts_mode::Xts128::new(
        Aes256::new_from_slice(&key_bytes[..32]).expect("key"),
        Aes256::new_from_slice(&key_bytes[32..]).expect("key"),
    );
    let e = measure(DATA_UNIT, |b, n| {
        xm.encrypt_sector(b, xts_mode::get_tweak_default(u128::from(n)))
    });
    report(
        "xts_encrypt_4k_xts_mode",
        "xts-mode crate encrypt",
        e,
        ref_enc,
    );
    let d = measure(DATA_UNIT, |b, n| {
        xm.decrypt_sector(b, xts_mode::get_tweak_default(u128::from(n)))
    });
    report(
        "xts_decrypt_4k_xts_mode",
        "xts-mode crate decrypt",
        d,
        ref_dec,
    );

    // The openssl crate at its best: one context, keyed once, only the IV reset per unit.
    let mut ctx = CipherCtx::new().expect("ctx");
    ctx.encrypt_init(Some(Cipher::aes_256_xts()), Some(&key_bytes), None)
        .expect("init");
    let mut out = vec![0u8; DATA_UNIT + 16];
    let e = measure(DATA_UNIT, |b, n| {
        let iv = u128::from(n).to_le_bytes();
        ctx.encrypt_init(None, None, Some(&iv)).expect("iv");
        ctx.cipher_update(b, Some(&mut out)).expect("update");
    });
    report(
        "xts_encrypt_4k_openssl_crate",
        "openssl crate EVP (context reused) encrypt",
        e,
        ref_enc,
    );
    let mut dctx = CipherCtx::new().expect("ctx");
    dctx.decrypt_init(Some(Cipher::aes_256_xts()), Some(&key_bytes), None)
        .expect("init");
    let d = measure(DATA_UNIT, |b, n| {
        let iv = u128::from(n).to_le_bytes();
        dctx.decrypt_init(None, None, Some(&iv)).expect("iv");
        dctx.cipher_update(b, Some(&mut out)).expect("update");
    });
    report(
        "xts_decrypt_4k_openssl_crate",
        "openssl crate EVP (context reused) decrypt",
        d,
        ref_dec,
    );

    println!("\nsha256, 512 KiB chunks, one core");
    let ref_sha = openssl_speed(&["-evp", "sha256"], 512 * 1024);
    if let Some(r) = ref_sha {
        report(
            "sha256_512k_openssl_speed",
            "openssl speed -evp sha256",
            r,
            None,
        );
    }
    let s = measure(512 * 1024, |b, _| {
        std::hint::black_box(ChunkHash::of(b));
    });
    report("sha256_512k", "sha2 crate (ChunkHash::of)", s, ref_sha);
}
