"""Run ``python <script> args`` for tests without paying the imports each time.

``run_tool_fast(args, ...)`` has :func:`conftest.run_tool`'s signature and
result (a ``subprocess.CompletedProcess``). The first call starts one server
process (this file run as a script) that imports only third-party base
libraries (torch, torchvision, numpy, cv2, mmengine's runner: about 5 s of
CPU per interpreter on a 2-core machine) and nothing of mmcv, mmdet, mmseg
or mmlocal, so registration and lazy imports still happen in the tool, as in
a fresh interpreter. Each call forks a child from it that sets up what a
fresh ``python`` would have, then runs the script as ``__main__``:

- ``sys.argv``, ``sys.path[0]`` (the script's folder, or ``''`` for ``-c``
  and ``-m``), the ``PYTHONPATH`` entries of ``env`` ahead of the
  interpreter's own path, ``os.environ`` = ``env``, the working directory;
- ``OMP_NUM_THREADS`` of ``env`` applied with ``torch.set_num_threads``
  (libgomp read the variable once, in the server);
- stdin from ``/dev/null``, stdout and stderr captured; the exit status of
  ``SystemExit`` or 1 with the traceback on stderr for an exception;
  ``atexit`` handlers run, as at a normal interpreter exit.

Not for tests that need a fresh interpreter (what a plain import loads,
whether a module is already imported) or a launcher (torchrun): use
:func:`conftest.run_tool` there. ``start_tool_fast`` starts several at once
(``wait()`` on each), so independent tools overlap on the two cores.
"""
import json
import os
import select
import subprocess
import sys
import tempfile

PRELOAD = ('torch', 'torchvision', 'numpy', 'cv2', 'mmengine.config',
           'mmengine.runner')


# ------------------------------------------------------------------ server
def _child(req):
    import atexit
    import runpy
    import traceback
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, req['stdout']), (2, req['stderr'])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(req['cwd'])
        os.environ.clear()
        os.environ.update(req['env'])
        extra = [p for p in req['env'].get('PYTHONPATH', '').split(
            os.pathsep) if p]
        args = req['args']
        if args[0] in ('-c', '-m'):
            first = os.getcwd() if args[0] == '-m' else ''
        else:
            first = os.path.dirname(os.path.abspath(args[0]))
        sys.path[:] = [first] + extra + req['base_path']
        threads = req['env'].get('OMP_NUM_THREADS')
        import torch
        torch.set_num_threads(int(threads) if threads else
                              (os.cpu_count() or 1))
        try:
            if args[0] == '-c':
                sys.argv = ['-c'] + args[2:]
                exec(compile(args[1], '<string>', 'exec'),
                     {'__name__': '__main__'})
            elif args[0] == '-m':
                sys.argv = [args[1]] + args[2:]
                runpy.run_module(args[1], run_name='__main__',
                                 alter_sys=True)
            else:
                sys.argv = list(args)
                runpy.run_path(args[0], run_name='__main__')
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve():
    """Read one JSON request per line on stdin; answer ``started ID PID``
    and later ``done ID STATUS`` on stdout."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    base_path = [p for p in sys.path[1:]]
    running = {}
    out = sys.stdout
    out.write('ready\n')
    out.flush()
    stdin = sys.stdin.fileno()
    buf = b''
    open_ = True
    while open_ or running:
        if open_:
            ready, _, _ = select.select([stdin], [], [], 0.05)
        else:
            ready = []
            import time
            time.sleep(0.05)
        if ready:
            chunk = os.read(stdin, 65536)
            if not chunk:
                open_ = False
                for pid in running:  # the client went away
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
            buf += chunk
            while b'\n' in buf:
                line, buf = buf.split(b'\n', 1)
                req = json.loads(line)
                req['base_path'] = base_path
                pid = os.fork()
                if pid == 0:
                    _child(req)
                running[pid] = req['id']
                out.write(f'started {req["id"]} {pid}\n')
                out.flush()
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rid = running.pop(pid)
                out.write(f'done {rid} {os.waitstatus_to_exitcode(status)}'
                          '\n')
                out.flush()


# ------------------------------------------------------------------ client
class _Server:

    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS='1')
        env.pop('PYTHONPATH', None)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '--serve'],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            cwd='/', text=True, bufsize=1)
        self.next_id = 0
        self.events = {}
        self.pending = b''  # read from the pipe, not yet a whole line
        if self._line(600) != 'ready':
            raise RuntimeError('tool server did not start')
        self.dir = tempfile.mkdtemp(prefix='tool_server_')

    def _line(self, timeout):
        """The server's next line (``None`` after ``timeout`` seconds).
        Read with ``os.read`` and split here: a buffered reader could hold
        a second line that ``select`` would then wait for in vain."""
        import time
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b'\n' not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError('tool server exited')
            self.pending += chunk
        line, self.pending = self.pending.split(b'\n', 1)
        return line.decode().strip()

    def wait_for(self, kind, rid, timeout):
        import time
        deadline = time.monotonic() + timeout
        while (kind, rid) not in self.events:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            line = self._line(left)
            if line is None:
                return None
            k, i, value = line.split()
            self.events[(k, int(i))] = int(value)
        return self.events.pop((kind, rid))

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_server = None


def _get_server():
    global _server
    if _server is None or not _server.alive():
        import atexit
        _server = _Server()
        atexit.register(_server.close)
    return _server


class FastTool:
    """A started tool; :meth:`wait` returns a ``CompletedProcess``."""

    def __init__(self, args, cwd, env, timeout, check):
        self.args, self.timeout, self.check = list(args), timeout, check
        server = _get_server()
        server.next_id += 1
        self.id = server.next_id
        self.stdout = os.path.join(server.dir, f'{self.id}.out')
        self.stderr = os.path.join(server.dir, f'{self.id}.err')
        server.proc.stdin.write(json.dumps(dict(
            id=self.id, args=self.args, cwd=str(cwd), env=env,
            stdout=self.stdout, stderr=self.stderr)) + '\n')
        server.proc.stdin.flush()
        self.pid = server.wait_for('started', self.id, 60)
        if self.pid is None:
            raise RuntimeError('tool server did not start ' +
                               ' '.join(self.args))

    def wait(self):
        server = _get_server()
        code = server.wait_for('done', self.id, self.timeout)
        if code is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            server.wait_for('done', self.id, 60)
            raise subprocess.TimeoutExpired(self.args, self.timeout)
        outs = []
        for path in (self.stdout, self.stderr):
            with open(path, encoding='utf-8', errors='replace') as f:
                outs.append(f.read())
            os.remove(path)
        proc = subprocess.CompletedProcess(
            [sys.executable] + self.args, code, outs[0], outs[1])
        if self.check and code != 0:
            raise AssertionError(
                f'command failed ({code}): {" ".join(self.args)}\n'
                f'--- stdout ---\n{outs[0][-6000:]}\n'
                f'--- stderr ---\n{outs[1][-6000:]}')
        return proc


def _env(env):
    from conftest import REPO
    full_env = dict(os.environ)
    full_env.setdefault('PYTHONPATH', REPO)
    full_env['OMP_NUM_THREADS'] = full_env.get('OMP_NUM_THREADS', '2')
    if env:
        full_env.update(env)
    return full_env


def start_tool_fast(args, cwd=None, check=True, timeout=600, env=None):
    """Start ``python <args>`` (see the module docstring); ``.wait()``."""
    from conftest import REPO
    return FastTool(args, cwd or REPO, _env(env), timeout, check)


def run_tool_fast(args, cwd=None, check=True, timeout=600, env=None):
    """:func:`conftest.run_tool` through the server (module docstring)."""
    return start_tool_fast(args, cwd, check, timeout, env).wait()


if __name__ == '__main__' and sys.argv[1:] == ['--serve']:
    serve()
