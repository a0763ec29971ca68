"""In-sandbox launcher: set resource limits, drop root, then exec the untrusted program.

This file's text is passed to the interpreter with ``python -I -S -c`` (it is never imported
inside the sandbox), so nothing on the sandbox's filesystem needs to be trusted. Standard
library only, and as little as possible runs before the exec.

argv: UID NPROC AS_BYTES CPU_S FSIZE_BYTES NOFILE -- COMMAND...
UID -1 keeps the current uid (a non-root host, where bubblewrap's user namespace already
makes RLIMIT_NPROC count only this sandbox's processes).
"""

import os
import resource
import sys


def _limit(res: int, soft: int, hard: int) -> None:
    # An unprivileged process cannot raise its hard limit; take the lower one.
    cur_hard = resource.getrlimit(res)[1]
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    resource.setrlimit(res, (soft, hard))


def main(argv: list[str]) -> None:
    uid, nproc, mem, cpu, fsize, nofile = (int(a) for a in argv[:6])
    cmd = argv[7:]  # argv[6] is the "--" separator
    _limit(resource.RLIMIT_AS, mem, mem)
    # Soft limit -> SIGXCPU, hard limit one second later -> SIGKILL.
    _limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    _limit(resource.RLIMIT_FSIZE, fsize, fsize)
    _limit(resource.RLIMIT_NOFILE, nofile, nofile)
    _limit(resource.RLIMIT_CORE, 0, 0)
    _limit(resource.RLIMIT_NPROC, nproc, nproc)
    if uid >= 0:
        # Root is exempt from RLIMIT_NPROC and owns /proc/sys: give the program a fresh uid.
        # Changing every uid away from 0 also clears all capabilities.
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException as e:  # report any setup failure, then exit: never run unlimited
        sys.stderr.write(f"posttrain-sandbox: launcher failed: {e!r}\n")
        os._exit(125)
