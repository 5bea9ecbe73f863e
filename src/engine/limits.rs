//! Limits that follow the machine: the open-file limit, and the connection limit derived
//! from it.
//!
//! A tunnel holds two descriptors (client and destination sockets); a forwarded request
//! briefly holds the same two. Upstream connections kept for reuse, DNS sockets, splice
//! pipes in use, log files and the runtime need more: [`connections_for`] keeps a tenth of
//! the limit plus 128 for them.

/// The process's open-file limit after raising the soft limit to the hard one: `(soft, hard)`.
/// None where the platform has no such limit or it cannot be read.
pub fn raise_open_files() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit write to / read from a valid rlimit struct we own.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
        Some((lim.rlim_cur as u64, lim.rlim_max as u64))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Most client connections that `open_files` descriptors serve: two each, after headroom.
pub fn connections_for(open_files: u64) -> usize {
    let reserve = 128 + open_files / 10;
    let usable = open_files.saturating_sub(reserve) / 2;
    usable.clamp(16, 1 << 22) as usize
}

/// The default when nothing else is known (no open-file limit to read).
pub const FALLBACK_MAX_CONNECTIONS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_follows_the_open_file_limit() {
        assert_eq!(connections_for(20_000), 8_936);
        assert_eq!(connections_for(1_024), 397);
        assert_eq!(connections_for(100), 16);
        // Two descriptors a connection, and the headroom, always fit in the limit.
        for limit in [256u64, 1_024, 4_096, 65_536, 1 << 20] {
            let n = connections_for(limit) as u64;
            assert!(2 * n + 128 <= limit, "{limit}: {n}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (soft, hard) = raise_open_files().expect("rlimit readable");
        assert_eq!(soft, hard);
    }
}
