//! What can be checked here of `docker-compose.yml` and the `Dockerfile`
//! without a Docker engine: every node's configuration parses and validates
//! with the real `ferry-server`, the nodes agree on the cluster's members and
//! each is reachable under the name it advertises, and the image builds with
//! the same steps as CI and ships the binaries the compose file runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use ferry_chaos_tests::bin_dir;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(repo().join(path)).with_context(|| path.to_owned())
}

/// `ferry-server --config-file <path> --dump-config`: the effective configuration.
fn dump(path: &str) -> Result<String> {
    let output = Command::new(bin_dir().join("ferry-server"))
        .args(["--config-file", path, "--dump-config"])
        .current_dir(repo())
        .env_clear()
        .output()?;
    ensure!(output.status.success(), "{path}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8(output.stdout)?)
}

/// The value of a top-level `key = value` line of a dumped configuration.
fn value<'a>(dumped: &'a str, key: &str) -> Option<&'a str> {
    dumped.lines().find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix('=')).map(str::trim)
}

/// The dumped `[[peers]]` tables, as text.
fn peers(dumped: &str) -> Vec<String> {
    dumped.split("[[peers]]").skip(1).map(|t| t.split("\n\n").next().unwrap_or_default().trim().to_owned()).collect()
}

#[test]
fn every_node_of_the_compose_file_has_a_valid_configuration() -> Result<()> {
    let compose = read("docker-compose.yml")?;
    let mut members: Option<Vec<String>> = None;
    for id in 1..=3 {
        let file = format!("docker/ferry-{id}.toml");
        ensure!(compose.contains(&format!("./{file}:/etc/ferry/ferry.toml")), "compose does not mount {file}");
        ensure!(compose.contains(&format!("hostname: ferry-{id}")), "compose has no host ferry-{id}");
        let dumped = dump(&file)?;
        assert_eq!(value(&dumped, "node-id"), Some(id.to_string().as_str()), "{file}");
        assert_eq!(value(&dumped, "node-name"), Some(format!("\"ferry-{id}\"").as_str()), "{file}");
        assert_eq!(value(&dumped, "advertised-address"), Some(format!("\"ferry-{id}:5122\"").as_str()), "{file}");
        let listed = peers(&dumped);
        assert_eq!(listed.len(), 3, "{file}: {listed:?}");
        assert!(listed
            .iter()
            .any(|p| p.contains(&format!("node-id = {id}")) && p.contains(&format!("ferry-{id}:5122"))));
        match &members {
            None => members = Some(listed),
            Some(first) => assert_eq!(first, &listed, "{file} lists other members than docker/ferry-1.toml"),
        }
        assert!(dumped.contains("brokers = [\"PLAINTEXT://kafka:9092\"]"), "{file}: {dumped}");
        assert!(dumped.contains("endpoint = \"http://jaeger:4317\""), "{file}: {dumped}");
    }
    for needed in ["image: apache/kafka:", "KAFKA_PROCESS_ROLES: broker,controller", "\"4317:4317\"", "\"16686:16686\""]
    {
        ensure!(compose.contains(needed), "compose lacks {needed}");
    }
    Ok(())
}

#[test]
fn a_configuration_with_a_bad_peer_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (text, expected) in [
        ("peers = [{ node-id = 1, address = \"a:1\" }, { node-id = 1, address = \"b:1\" }]", "listed twice"),
        ("peers = [{ node-id = 2, address = \"nowhere\" }]", "not host:port"),
        ("advertised-address = \"x:1\"\npeers = [{ node-id = 1, address = \"y:1\" }]", "differs"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text)?;
        let output = Command::new(bin_dir().join("ferry-server"))
            .arg("--config-file")
            .arg(&path)
            .arg("--dump-config")
            .env_clear()
            .output()?;
        assert_eq!(output.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("peers[") && stderr.contains(expected), "{text}: {stderr}");
    }
    Ok(())
}

#[test]
fn the_image_builds_like_ci_and_ships_what_compose_runs() -> Result<()> {
    let dockerfile = read("Dockerfile")?;
    let test_script = read("scripts/test.sh")?;
    for script in [&dockerfile, &test_script] {
        ensure!(script.contains("scripts/install-build-deps.sh"), "build tools are installed another way");
    }
    ensure!(test_script.contains("cargo build --workspace --all-targets --locked"), "CI's build command changed");
    ensure!(
        dockerfile.contains("cargo build --release --workspace --bins --locked"),
        "the image does not build like CI"
    );
    let compose = read("docker-compose.yml")?;
    for binary in ["ferry-server", "ferry", "ferry-test-handlers", "ferry-produce"] {
        ensure!(
            dockerfile.contains(&format!("/src/target/release/{binary} "))
                || dockerfile.contains(&format!("/src/target/release/{binary}\n")),
            "the image lacks {binary}"
        );
        ensure!(bin_dir().join(binary).exists(), "the workspace builds no {binary}");
    }
    ensure!(compose.contains("\"ferry-test-handlers\", \"--host\", \"0.0.0.0\""), "handlers listen on loopback only");
    let help = Command::new(bin_dir().join("ferry-test-handlers")).arg("--help").output()?;
    ensure!(String::from_utf8_lossy(&help.stdout).contains("--host"), "ferry-test-handlers takes no --host");
    Ok(())
}
