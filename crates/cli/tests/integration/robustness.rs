//! The `dnsfence` binary on hostile plumbing: a reader that goes away (`| head`), empty
//! policy files, sockets already taken.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic is a test failure"
)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use dnsfence_testsupport::TempDir;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dnsfence() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dnsfence"));
    command.current_dir(root());
    command
}

/// Runs `command` with its standard output a pipe whose reader is already gone, as in
/// `dnsfence ... | head -0`: every write to it fails with EPIPE.
fn with_closed_stdout(command: &mut Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    command
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// A stand-in for the proxy's API socket: answers each request line with `answer`.
fn fake_api(dir: &Path, answer: String) -> PathBuf {
    let path = dir.join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_ok() {
                let _ = stream.write_all(answer.as_bytes());
            }
        }
    });
    path
}

#[test]
fn a_reader_that_goes_away_ends_every_printing_command_quietly() {
    let tmp = TempDir::new("closed-stdout");
    let entries: Vec<serde_json::Value> = (0..2000)
        .map(|i| serde_json::json!({"name": format!("n{i}.example.com"), "ips": [{"ip": "192.0.2.1", "ttl": 30}], "selectors": ["*.example.com"]}))
        .collect();
    let api = fake_api(
        tmp.path(),
        format!("{}\n", serde_json::json!({"version": 1, "fqdns": entries})),
    );
    let observe_dir = tmp.path().join("observe");
    std::fs::create_dir(&observe_dir).unwrap();
    let flows: String = (0..2000)
        .map(|i| format!("{}\n", serde_json::json!({"version": 1, "flow": {"time": format!("t{i:05}"), "type": "dns", "verdict": "allowed", "dns": {"query": "a.example.com"}}})))
        .collect();
    let observe_api = fake_api(&observe_dir, flows);
    let config = tmp.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "api: {{socket: {0}/none.sock, agent_socket: {0}/none-agent.sock}}\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    let api = api.to_str().unwrap();
    let observe_api = observe_api.to_str().unwrap();
    let config = config.to_str().unwrap();
    let commands: &[&[&str]] = &[
        &["fqdn", "list", "--socket", api],
        &["fqdn", "list", "-o", "json", "--socket", api],
        &["observe", "--socket", observe_api, "--last", "2000"],
        &["observe", "-o", "json", "--socket", observe_api],
        &["status", "-c", config],
        &["status", "-c", config, "-o", "json"],
        &["policy", "validate", "examples/policies"],
        &[
            "policy",
            "check",
            "-f",
            "examples/policies",
            "--name",
            "a.com",
        ],
        &[
            "policy",
            "check",
            "-f",
            "examples/policies",
            "--name",
            "a.com",
            "-o",
            "json",
        ],
        &["manifests"],
        &["manifests", "crds"],
    ];
    for args in commands {
        let out = with_closed_stdout(dnsfence().args(*args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
    }
    // A broken pipe to the proxy is not a closed stdout: still an error.
    let out = dnsfence()
        .args(["fqdn", "list", "--socket"])
        .arg(tmp.path().join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_empty_policy_file_is_invalid() {
    let tmp = TempDir::new("empty-policy");
    let dir = tmp.path();
    std::fs::write(dir.join("empty.yaml"), "").unwrap();
    std::fs::write(dir.join("comments.yaml"), "# truncated\n\n").unwrap();
    std::fs::create_dir(dir.join("nothing")).unwrap();
    let out = dnsfence()
        .args(["policy", "validate"])
        .arg(dir.join("empty.yaml"))
        .arg(dir.join("comments.yaml"))
        .arg(root().join("examples/policies/01-billing-stripe-s3.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for file in ["empty.yaml", "comments.yaml"] {
        let line = format!(
            "{}:1: (file): holds no policy documents",
            dir.join(file).display()
        );
        assert!(stderr.contains(&line), "missing {line:?} in:\n{stderr}");
    }
    // A directory without policy files is no policy at all, and fine.
    let out = dnsfence()
        .args(["policy", "validate"])
        .arg(dir.join("nothing"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
