//! Where the datapath's objects are pinned: the layout directory (its version in its name),
//! other layouts left by other agent versions, read-only handles on pins, and `--cleanup`.

use std::path::{Path, PathBuf};

use lb_common::PIN_LAYOUT_VERSION;

/// Where this version's pins live: `<pin-dir>/v<PIN_LAYOUT_VERSION>`; maps directly in it, program
/// links under `links/`. bpffs holds only BPF objects and directories, so the layout version is
/// carried by the directory name.
pub fn layout_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{PIN_LAYOUT_VERSION}"))
}

/// `BPF_FS_MAGIC`: the file system type of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where `pin_dir` would live, if not on bpffs: the nearest existing directory at or above it and
/// its file system type. `None` when that directory is on bpffs (or cannot be looked at: the
/// caller's own error then says what went wrong).
pub(super) fn not_on_bpffs(pin_dir: &Path) -> Option<(PathBuf, i64)> {
    let absolute = std::path::absolute(pin_dir).ok()?;
    let mut dir = absolute.as_path();
    // A directory that cannot be looked at stops the walk: its own error says why.
    while !dir.try_exists().ok()? {
        dir = dir.parent()?;
    }
    let kind = fs_type(dir).ok()?;
    (kind != BPF_FS_MAGIC).then(|| (dir.to_path_buf(), kind))
}

/// The type (magic number) of the file system `path` is on (statfs).
pub(super) fn fs_type(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs is plain integers, for which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs buffer to fill.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // f_type is signed on some targets: its low 32 bits hold the magic.
    #[allow(clippy::unnecessary_cast, reason = "f_type's type differs between C libraries")]
    Ok(i64::from(st.f_type as u32))
}

/// An exclusive hold on `pin_dir` (an flock on the directory, which every container that mounts the
/// host's bpffs sees): two agents (a rolling update's surge, one started by hand) never write the
/// same maps at once, and `--cleanup` never removes what a running agent uses. Released when the
/// process exits, however it exits.
pub struct PinLock {
    _dir: std::fs::File,
}

impl PinLock {
    /// Whether the held directory is still the one at `pin_dir` (not removed, nor replaced).
    pub fn holds(&self, pin_dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let (Ok(held), Ok(now)) = (self._dir.metadata(), std::fs::metadata(pin_dir)) else { return false };
        held.nlink() > 0 && (now.dev(), now.ino()) == (held.dev(), held.ino())
    }
}

/// Takes the hold on `pin_dir` (made if missing); `Ok(None)` while another process has it.
pub fn try_lock(pin_dir: &Path) -> Result<Option<PinLock>, super::DatapathError> {
    use std::os::fd::AsRawFd as _;
    if let Some((dir, kind)) = not_on_bpffs(pin_dir) {
        return Err(super::DatapathError::NotBpffs { pin_dir: pin_dir.to_path_buf(), dir, kind });
    }
    let dir_err = |source| super::DatapathError::PinDir { path: pin_dir.to_path_buf(), source };
    std::fs::create_dir_all(pin_dir).map_err(dir_err)?;
    let dir = std::fs::File::open(pin_dir).map_err(dir_err)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::WouldBlock { Ok(None) } else { Err(dir_err(e)) };
    }
    // The hold counts only on the directory that is at the path now: one removed (by --cleanup,
    // or by hand) after it was opened is not what the next agent will find.
    use std::os::unix::fs::MetadataExt as _;
    let held = dir.metadata().map_err(dir_err)?;
    let now = std::fs::metadata(pin_dir).ok();
    if held.nlink() == 0 || now.is_none_or(|m| (m.dev(), m.ino()) != (held.dev(), held.ino())) {
        return Ok(None);
    }
    Ok(Some(PinLock { _dir: dir }))
}

/// Whether `pin_dir` is (or would be made) on bpffs.
pub fn on_bpffs(pin_dir: &Path) -> bool {
    not_on_bpffs(pin_dir).is_none()
}

/// Other layout versions pinned under `pin_dir`.
pub(super) fn other_layouts(pin_dir: &Path) -> Vec<String> {
    let ours = format!("v{PIN_LAYOUT_VERSION}");
    std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('v') && n[1..].parse::<u32>().is_ok() && *n != ours)
        .collect()
}

/// Removes everything the agent pinned under `pin_dir`: unpinning the links detaches the programs
/// (netlink filters are deleted as recorded); removing the maps drops them (and with them every
/// tracked flow).
pub fn cleanup(pin_dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return Ok(0) };
    for layout in entries.flatten() {
        // Netlink filters are not pinned links: deleted as the layout recorded them. One that
        // cannot be deleted stops the cleanup with its record kept.
        if let Some(mut records) = super::tc_filters::open(&layout.path()) {
            removed += super::tc_filters::detach_all(&mut records)
                .map_err(|left| std::io::Error::other(left.join("; ")))?;
        }
        let links = layout.path().join("links");
        for l in std::fs::read_dir(&links).into_iter().flatten().flatten() {
            std::fs::remove_file(l.path())?;
            removed += 1;
        }
        let _ = std::fs::remove_dir(&links);
        for m in std::fs::read_dir(layout.path()).into_iter().flatten().flatten() {
            std::fs::remove_file(m.path())?;
            removed += 1;
        }
        std::fs::remove_dir(layout.path())?;
    }
    // lb's filters no record names (an agent killed between adding one and recording it).
    removed +=
        super::tc_filters::delete_unrecorded().map_err(|left| std::io::Error::other(left.join("; ")))?;
    let _ = std::fs::remove_dir(pin_dir);
    Ok(removed)
}

/// BPF_OBJ_GET with BPF_F_RDONLY: a read-only handle on a pinned map (aya opens pins read-write).
pub(super) fn obj_get_read_only(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // union bpf_attr, BPF_OBJ_GET variant: pathname (u64), bpf_fd (u32), file_flags (u32),
    // path_fd (s32); the rest zero.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _rest: [u8; 108],
    }
    let attr = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
        path_fd: 0,
        _rest: [0; 108],
    };
    // SAFETY: a valid bpf_attr of the size passed; the path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
