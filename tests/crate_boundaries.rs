//! The crate boundaries of ARCHITECTURE.md, checked on the lock file: the wire protocol and the federation core
//! never pull in burn, wgpu, tokio or quinn, and the network layer never pulls in burn; so a user of the wire format
//! or of the strategies compiles none of them, and the round logic stays testable without sockets or a device.

use std::collections::{BTreeMap, BTreeSet};

/// Each package of Cargo.lock with the names of its dependencies.
fn lock() -> BTreeMap<String, Vec<String>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let text = std::fs::read_to_string(&path).unwrap();
    let lock: toml::Table = toml::from_str(&text).unwrap();
    let mut out = BTreeMap::new();
    for p in lock["package"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap().to_string();
        // An entry is "name" or "name version" (when several versions are locked).
        let deps = p
            .get("dependencies")
            .and_then(|d| d.as_array())
            .map(|d| {
                d.iter()
                    .map(|x| x.as_str().unwrap().split(' ').next().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        out.entry(name).or_insert_with(Vec::new).extend::<Vec<String>>(deps);
    }
    out
}

/// Every package `root` depends on, directly or not.
fn closure(lock: &BTreeMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(p) = todo.pop() {
        for d in lock.get(&p).unwrap_or_else(|| panic!("{p} is not in Cargo.lock")) {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

/// Checks that nothing `root` depends on starts with one of `banned` or is one of the crates in `crates`.
fn assert_free_of(root: &str, banned: &[&str], crates: &[&str]) {
    let deps = closure(&lock(), root);
    assert!(deps.len() > 3, "{root} has dependencies: {deps:?}");
    let found: Vec<_> = deps
        .iter()
        .filter(|d| banned.iter().any(|b| d.starts_with(b)) || crates.contains(&d.as_str()))
        .collect();
    assert!(found.is_empty(), "{root} depends on {found:?}");
}

const RUNTIMES: [&str; 6] = ["burn", "cubecl", "wgpu", "tokio", "quinn", "rustls"];

#[test]
fn the_protocol_and_the_federation_core_need_no_burn_tokio_or_quinn() {
    assert_free_of(
        "offsite-protocol",
        &RUNTIMES,
        &["offsite", "offsite-fed", "offsite-net"],
    );
    assert_free_of("offsite-fed", &RUNTIMES, &["offsite", "offsite-net"]);
}

#[test]
fn the_network_layer_needs_no_burn() {
    assert_free_of("offsite-net", &["burn", "cubecl", "wgpu", "tokenizers"], &["offsite"]);
    // And the check itself can fail: the model crate does depend on burn.
    assert!(closure(&lock(), "offsite").iter().any(|d| d.starts_with("burn")));
}
