//! The Unix accounts the local spawner runs users' processes under when berth
//! runs as root: one per berth user (`berth-<name>`), made on first use with
//! the standard tool (`useradd`), a uid from the configured range (its own
//! group of the same id), and a home under the data directory that only its
//! user can read. An account berth did not make is never used: berth marks
//! its own with a comment (GECOS field) and keeps to its uid range.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use berth_core::UserName;
use nix::unistd::{Gid, Group, Uid, User};

use crate::SpawnError;

/// The start of the accounts' names.
pub(crate) const PREFIX: &str = "berth-";
/// Linux's limit on a user name's length (utmp's, and useradd's).
pub(crate) const NAME_MAX: usize = 32;
/// The comment berth writes into the accounts it makes: `berth user <name>`.
const MARKER: &str = "berth user";

/// Serialises account creation within this process (a uid is picked before
/// `useradd` runs); other processes are handled by retrying.
static CREATING: Mutex<()> = Mutex::new(());

/// A user's own Unix account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: PathBuf,
    /// The login shell of its passwd entry.
    pub(crate) shell: PathBuf,
}

fn fail(message: String) -> SpawnError {
    SpawnError::Failed(message)
}

/// The account name for a berth user, checked against Linux's limit.
pub(crate) fn account_name(user: &str) -> Result<String, SpawnError> {
    let name = UserName::parse(user).map_err(|e| fail(format!("no Unix account for {user:?}: {e}")))?;
    let account = format!("{PREFIX}{}", name.as_str());
    if account.len() > NAME_MAX {
        return Err(fail(format!(
            "{user}'s processes cannot run under their own Unix account: its name {account} would be {} characters \
             and Linux allows {NAME_MAX}, so local servers of users named with more than {} characters cannot start \
             while berth runs as root (rename the user, or turn the local spawner's user isolation off)",
            account.len(),
            NAME_MAX - PREFIX.len()
        )));
    }
    Ok(account)
}

fn comment(user: &str) -> String {
    format!("{MARKER} {user}")
}

fn check_range(uids: &RangeInclusive<u32>) -> Result<(), SpawnError> {
    if *uids.start() == 0 || uids.is_empty() {
        return Err(fail(format!(
            "the local spawner's uid range {}..={} is unusable: it must be non-empty and exclude 0",
            uids.start(),
            uids.end()
        )));
    }
    Ok(())
}

/// Finds `user`'s account or makes it, then prepares its home (`home`, whose
/// parent is made traversable but not listable). Blocking: run it off the runtime.
pub(crate) fn ensure(user: &str, home: &Path, uids: RangeInclusive<u32>) -> Result<Account, SpawnError> {
    let name = account_name(user)?;
    check_range(&uids)?;
    let account = {
        let _one_at_a_time = CREATING.lock().unwrap_or_else(|e| e.into_inner());
        match existing(user, &name, home, &uids)? {
            Some(a) => a,
            None => create(user, &name, home, &uids)?,
        }
    };
    prepare_home(&account)?;
    Ok(account)
}

/// The account if it exists and berth made it for this data directory.
fn existing(user: &str, name: &str, home: &Path, uids: &RangeInclusive<u32>) -> Result<Option<Account>, SpawnError> {
    let Some(u) = User::from_name(name).map_err(|e| fail(format!("cannot look up the Unix account {name}: {e}")))?
    else {
        return Ok(None);
    };
    let gecos = u.gecos.to_string_lossy().into_owned();
    let uid = u.uid.as_raw();
    if gecos != comment(user) || !uids.contains(&uid) {
        return Err(fail(format!(
            "the Unix account {name} exists but berth did not make it (uid {uid}, comment {gecos:?}; berth's have \
             uids {}..={} and the comment {:?}), so berth will not run {user}'s processes under it: remove or rename \
             that account",
            uids.start(),
            uids.end(),
            comment(user)
        )));
    }
    let owner = User::from_uid(u.uid).ok().flatten().map(|o| o.name);
    if owner.as_deref() != Some(name) {
        return Err(fail(format!(
            "uid {uid} of the Unix account {name} also belongs to {}; berth will not share it",
            owner.unwrap_or_else(|| "another account".into())
        )));
    }
    if u.dir != home {
        match std::fs::symlink_metadata(&u.dir) {
            // Left by an earlier data directory (moved, or a test's): take it over.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                run(
                    Command::new(tool("usermod")?).arg("--home").arg(home).arg(name),
                    &format!("moving {name}'s home"),
                )?;
                tracing::info!(account = name, from = %u.dir.display(), to = %home.display(), "moved a berth account's home");
            }
            _ => {
                return Err(fail(format!(
                    "the Unix account {name} belongs to another berth data directory (its home is {}, not {}); \
                     remove it (userdel {name}) or give it this home (usermod --home {} {name})",
                    u.dir.display(),
                    home.display(),
                    home.display()
                )))
            }
        }
    }
    Ok(Some(Account { name: name.to_string(), uid, gid: u.gid.as_raw(), home: home.to_path_buf(), shell: u.shell }))
}

/// The first uid of the range that neither an account nor a group (its
/// group gets the same id) uses, skipping those `useradd` found taken.
fn free_id(uids: &RangeInclusive<u32>, taken: &BTreeSet<u32>) -> Result<u32, SpawnError> {
    for id in uids.clone().filter(|id| !taken.contains(id)) {
        let user = User::from_uid(Uid::from_raw(id)).map_err(|e| fail(format!("cannot look up uid {id}: {e}")))?;
        let group = Group::from_gid(Gid::from_raw(id)).map_err(|e| fail(format!("cannot look up gid {id}: {e}")))?;
        if user.is_none() && group.is_none() {
            return Ok(id);
        }
    }
    Err(fail(format!(
        "no free uid is left in the local spawner's range {}..={} (every one belongs to an account or a group)",
        uids.start(),
        uids.end()
    )))
}

fn create(user: &str, name: &str, home: &Path, uids: &RangeInclusive<u32>) -> Result<Account, SpawnError> {
    let useradd = tool("useradd")?;
    let shell = ["/bin/bash", "/bin/sh"].into_iter().find(|s| Path::new(s).is_file()).unwrap_or("/bin/sh");
    let mut taken = BTreeSet::new();
    let mut locked = 0;
    loop {
        let id = free_id(uids, &taken)?;
        // Not --system: that takes the group's id from the small system
        // range; the account has no password and no home made for it.
        let out = Command::new(&useradd)
            .args(["--uid", &id.to_string(), "--user-group", "--no-create-home", "--no-log-init"])
            .arg("--home-dir")
            .arg(home)
            .args(["--shell", shell, "--comment", &comment(user), name])
            .output()
            .map_err(|e| fail(format!("cannot run {}: {e}", useradd.display())))?;
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        match out.status.code() {
            Some(0) => break,
            // The uid was taken since it was looked up (another process).
            Some(4) => {
                taken.insert(id);
            }
            // The name was taken meanwhile: another berth process made it, or a group has it.
            Some(9) => {
                return existing(user, name, home, uids)?.ok_or_else(|| {
                    fail(format!(
                        "cannot make the Unix account {name}: {err} (remove the group {name}: groupdel {name})"
                    ))
                })
            }
            // The passwd or group file is locked by another tool for a moment.
            Some(1 | 10) if locked < 50 && err.contains("lock") => {
                locked += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            _ => return Err(fail(format!("cannot make the Unix account {name} ({}): {err}", out.status))),
        }
    }
    tracing::info!(user, account = name, "made a Unix account for a berth user");
    existing(user, name, home, uids)?.ok_or_else(|| fail(format!("useradd made {name} but it cannot be found")))
}

/// Removes `user`'s account if berth made it; returns whether there was one.
pub(crate) fn remove(user: &str, uids: RangeInclusive<u32>) -> Result<bool, SpawnError> {
    // A name too long for an account never had one.
    let Ok(name) = account_name(user) else { return Ok(false) };
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let Some(u) = User::from_name(&name).map_err(|e| fail(format!("cannot look up the Unix account {name}: {e}")))?
    else {
        return Ok(false);
    };
    if u.gecos.to_string_lossy() != comment(user) || !uids.contains(&u.uid.as_raw()) {
        tracing::warn!(account = %name, "not removing a Unix account berth did not make");
        return Ok(false);
    }
    run(Command::new(tool("userdel")?).arg(&name), &format!("removing the Unix account {name}"))?;
    tracing::info!(user, account = %name, "removed a berth user's Unix account");
    Ok(true)
}

/// Makes the home: `home/` traversable by all but listable by none, the home
/// itself the account's with mode 0700 (a home from before isolation, which
/// berth's own user owned, is handed over with what is in it).
fn prepare_home(a: &Account) -> Result<(), SpawnError> {
    let root = a.home.parent().ok_or_else(|| fail(format!("{} has no parent", a.home.display())))?;
    std::fs::create_dir_all(root)?;
    let meta = std::fs::symlink_metadata(root)?;
    if !meta.file_type().is_dir() {
        return Err(fail(format!("{} is not a plain directory", root.display())));
    }
    if meta.mode() & 0o7777 != 0o711 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
    }
    let meta = match std::fs::symlink_metadata(&a.home) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().mode(0o700).create(&a.home)?;
            std::fs::symlink_metadata(&a.home)?
        }
        Err(e) => return Err(e.into()),
        Ok(m) => m,
    };
    if !meta.file_type().is_dir() {
        return Err(fail(format!("{} is not a plain directory (a symlink or a file)", a.home.display())));
    }
    if meta.uid() != a.uid || meta.gid() != a.gid {
        hand_over(&a.home, a.uid, a.gid)?;
        std::os::unix::fs::lchown(&a.home, Some(a.uid), Some(a.gid))?;
        std::fs::set_permissions(&a.home, std::fs::Permissions::from_mode(0o700))?;
        tracing::info!(account = %a.name, home = %a.home.display(), "handed the home over to its account");
    }
    reachable(&a.home, a, false).map_err(|why| {
        fail(format!(
            "{} cannot reach its home {}: {why}; the data directory and every directory above it must be \
             traversable by other users (mode 0711 or 0755)",
            a.name,
            a.home.display()
        ))
    })
}

/// Gives everything under `dir` to `uid`:`gid`, not following links; a file
/// with more than one hard link is left alone (it may be someone else's).
fn hand_over(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.file_type().is_file() && meta.nlink() > 1 {
                continue;
            }
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
            if meta.file_type().is_dir() {
                todo.push(path);
            }
        }
    }
    Ok(())
}

/// Whether the account can pass through every directory above `path` (and,
/// with `run`, execute `path`); otherwise which one stops it. By mode bits,
/// as the kernel decides for an account with no other groups (ACLs aside).
pub(crate) fn reachable(path: &Path, a: &Account, run: bool) -> Result<(), String> {
    let allows = |m: &std::fs::Metadata| {
        let bit = if m.uid() == a.uid {
            0o100
        } else if m.gid() == a.gid {
            0o010
        } else {
            0o001
        };
        m.mode() & bit != 0
    };
    let dirs: Vec<&Path> = path.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()).collect();
    for dir in dirs.into_iter().rev() {
        let m = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !allows(&m) {
            return Err(format!("{} is mode {:04o} (owner uid {})", dir.display(), m.mode() & 0o7777, m.uid()));
        }
    }
    if run {
        let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !allows(&m) {
            return Err(format!("{} is mode {:04o} (owner uid {})", path.display(), m.mode() & 0o7777, m.uid()));
        }
    }
    Ok(())
}

/// Whether the account can run `exe`: the file and the directories above
/// it, where its links lead, and a script's interpreter (`#!`) likewise.
pub(crate) fn runnable(exe: &Path, a: &Account) -> Result<(), String> {
    let mut paths = vec![exe.to_path_buf()];
    if let Ok(script) = std::fs::File::open(exe) {
        use std::io::{BufRead, Read};
        let mut first = String::new();
        let _ = std::io::BufReader::new(script.take(512)).read_line(&mut first);
        if let Some(interpreter) = first.strip_prefix("#!").and_then(|l| l.split_whitespace().next()) {
            paths.push(PathBuf::from(interpreter));
        }
    }
    for path in paths {
        reachable(&path, a, true)?;
        if let Ok(real) = std::fs::canonicalize(&path) {
            if real != path {
                reachable(&real, a, true).map_err(|why| format!("{why} (where {} leads)", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Opens a directory tree berth made (the provided virtualenv) to every
/// user: directories 0755, files readable by all, executables executable by
/// all. Links are not followed.
pub(crate) fn open_to_all(root: &Path) -> std::io::Result<()> {
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        if std::fs::symlink_metadata(&dir)?.mode() & 0o7777 != 0o755 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        }
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.file_type().is_dir() {
                todo.push(path);
            } else if meta.file_type().is_file() {
                let mode = meta.mode() & 0o7777;
                let open = mode | 0o444 | if mode & 0o100 != 0 { 0o111 } else { 0 };
                if open != mode {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(open))?;
                }
            }
        }
    }
    Ok(())
}

/// A system administration tool (in sbin, which a service's PATH may lack).
fn tool(name: &str) -> Result<PathBuf, SpawnError> {
    crate::local::which(name)
        .or_else(|| ["/usr/sbin", "/sbin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file()))
        .ok_or_else(|| {
            fail(format!(
                "{name} is not installed, so berth cannot manage its users' Unix accounts (install the passwd \
                 package, or turn the local spawner's user isolation off)"
            ))
        })
}

fn run(cmd: &mut Command, what: &str) -> Result<(), SpawnError> {
    let out = cmd.output().map_err(|e| fail(format!("{what} failed: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(fail(format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names_fit_linuxs_limit_or_say_why_not() {
        assert_eq!(account_name("alice").unwrap(), "berth-alice");
        let longest = "a".repeat(NAME_MAX - PREFIX.len());
        assert_eq!(account_name(&longest).unwrap().len(), NAME_MAX);
        let err = account_name(&format!("{longest}b")).unwrap_err().to_string();
        assert!(err.contains("33 characters") && err.contains("allows 32") && err.contains("more than 26"), "{err}");
        assert!(account_name("../etc").is_err());
        assert!(account_name("Root").is_err());
    }

    #[test]
    fn a_range_with_uid_0_or_nothing_in_it_is_refused() {
        assert!(check_range(&(0..=10)).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 30..=20;
        assert!(check_range(&empty).is_err());
        assert!(check_range(&(20000..=29999)).is_ok());
    }

    #[test]
    fn reachability_names_the_directory_in_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let closed = tmp.path().join("closed");
        let inner = closed.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let a = Account {
            name: "berth-x".into(),
            uid: 4_000_000_000,
            gid: 4_000_000_000,
            home: inner.clone(),
            shell: "/bin/sh".into(),
        };
        let err = reachable(&inner, &a, false).unwrap_err();
        assert!(err.starts_with(&format!("{} is mode 0700", closed.display())), "{err}");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        reachable(&inner, &a, false).unwrap();
        let prog = inner.join("prog");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(reachable(&prog, &a, true).is_err(), "only its owner may run it");
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        reachable(&prog, &a, true).unwrap();
        runnable(&prog, &a).unwrap();

        // A link into a closed directory, and a script whose interpreter is there.
        let hidden = tmp.path().join("hidden");
        std::fs::create_dir(&hidden).unwrap();
        std::fs::write(hidden.join("python"), "").unwrap();
        std::fs::set_permissions(hidden.join("python"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = inner.join("python");
        std::os::unix::fs::symlink(hidden.join("python"), &link).unwrap();
        let err = runnable(&link, &a).unwrap_err();
        assert!(err.contains("hidden is mode 0700") && err.contains("where"), "{err}");
        std::fs::write(&prog, format!("#!{} -E\n", link.display())).unwrap();
        let err = runnable(&prog, &a).unwrap_err();
        assert!(err.contains("hidden is mode 0700"), "{err}");
    }

    #[test]
    fn a_provided_tree_is_opened_to_everyone() {
        let tmp = tempfile::tempdir().unwrap();
        let venv = tmp.path().join("venv");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::write(venv.join("bin").join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::write(venv.join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        std::os::unix::fs::symlink("/usr/bin/python3", venv.join("bin").join("python")).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        for (p, m) in [(venv.join("bin").join("tool"), 0o700), (venv.join("pyvenv.cfg"), 0o600)] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        for d in [venv.join("bin"), venv.clone()] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        open_to_all(&venv).unwrap();
        assert_eq!(mode(&venv), 0o755);
        assert_eq!(mode(&venv.join("bin")), 0o755);
        assert_eq!(mode(&venv.join("bin").join("tool")), 0o755);
        assert_eq!(mode(&venv.join("pyvenv.cfg")), 0o644);
    }
}
