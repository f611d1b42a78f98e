//! The local spawner without user isolation (as when berth is not root).

use super::*;
use crate::local::process::alive;

fn spec(prefix: &str) -> SpawnSpec {
    SpawnSpec {
        owner_id: String::new(),
        build: Vec::new(),
        user: "al".into(),
        server: String::new(),
        env: BTreeMap::new(),
        cmd: vec![],
        prefix: prefix.into(),
        template: String::new(),
        image: None,
        gpus: vec![],
        port: None,
        volumes: Vec::new(),
    }
}

#[test]
fn own_start_time_is_readable() {
    let me = std::process::id();
    assert!(start_time(me).is_some());
    assert!(alive(me, start_time(me), None));
    assert!(!alive(me, start_time(me).map(|t| t + 1), None), "a different start time is another process");
    let uid = nix::unistd::getuid().as_raw();
    assert!(alive(me, start_time(me), Some(uid)));
    assert!(!alive(me, start_time(me), Some(uid.wrapping_add(1))), "another account's process is not ours");
}

#[tokio::test]
async fn start_poll_stop_a_real_process() {
    let dir = tempfile::tempdir().unwrap();
    let s = plain_spawner(vec!["sleep".into(), "30".into()], dir.path().to_path_buf());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let spec = spec("/user/al/");
    let started = s.start(spec, tx).await.unwrap();
    assert_eq!(s.poll(&started.state).await.unwrap(), Status::Running);
    s.stop(&started.state, StopGrace::default()).await.unwrap();
    let mut status = s.poll(&started.state).await.unwrap();
    for _ in 0..50 {
        if status != Status::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = s.poll(&started.state).await.unwrap();
    }
    assert!(matches!(status, Status::Exited(_)), "{status:?}");
    assert!(matches!(s.poll(&json!({})).await, Err(SpawnError::BadState(_))));
}

#[tokio::test]
async fn removing_user_data_removes_only_the_plain_home() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep.txt"), "precious").unwrap();
    let s = plain_spawner(vec![], data.clone());

    // No home (not even `home/`) is not an error.
    s.remove_user_data("al", "").await.unwrap();

    // A home with files, a subdirectory and a link out: the home goes, the
    // link's target and the logs stay.
    let home = data.join("home").join("al");
    std::fs::create_dir_all(home.join("work")).unwrap();
    std::fs::write(home.join("work").join("notes.txt"), "x").unwrap();
    std::os::unix::fs::symlink(&outside, home.join("link-out")).unwrap();
    std::fs::create_dir_all(data.join("logs")).unwrap();
    std::fs::write(data.join("logs").join("al.log"), "log").unwrap();
    s.remove_user_data("al", "").await.unwrap();
    assert!(!home.exists());
    assert!(data.join("home").is_dir(), "only the user's home goes");
    assert!(data.join("logs").join("al.log").is_file(), "logs stay");
    assert!(outside.join("keep.txt").is_file());

    // A home that is a symlink out of `home/` is refused, not followed.
    let linked = data.join("home").join("bo");
    std::os::unix::fs::symlink(&outside, &linked).unwrap();
    let err = s.remove_user_data("bo", "").await.unwrap_err().to_string();
    assert!(err.contains("not a plain directory"), "{err}");
    assert!(outside.join("keep.txt").is_file(), "the link's target survives");
    assert!(std::fs::symlink_metadata(&linked).unwrap().file_type().is_symlink());

    // A name that is not a user name never becomes a path.
    assert!(s.remove_user_data("../outside", "").await.is_err());
    assert!(s.remove_user_data("", "").await.is_err());
    assert!(outside.join("keep.txt").is_file());
}

#[tokio::test]
async fn missing_command_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = plain_spawner(vec!["no-such-program-berth".into()], dir.path().to_path_buf());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let spec = spec("/");
    let err = s.start(spec, tx).await.unwrap_err().to_string();
    assert!(err.contains("no-such-program-berth") && err.contains("not found"), "{err}");
}

/// A local spawner running `cmd` as berth's own user, without provisioning.
fn plain_spawner(cmd: Vec<String>, data_dir: std::path::PathBuf) -> LocalSpawner {
    LocalSpawner::new(LocalConfig {
        cmd,
        data_dir,
        provision: false,
        provision_packages: vec![],
        isolate_users: false,
        ..LocalConfig::default()
    })
}
