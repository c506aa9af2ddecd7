"""nginx for the benchmarks: the upstream app and the reverse-proxy anchor.

Each nginx runs from a generated config in its own temp dir (`daemon off`, pid file and
logs there, one worker, loopback only) as a child process of the bench; the system
nginx, its config and port 80 are never touched. `ensure_installed()` installs nginx
and wrk from Debian's packages when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["UPSTREAM_BODY", "app_config", "command", "ensure_installed", "nginx_version", "proxy_config"]

UPSTREAM_BODY = "hello from the upstream\n"
"""What the upstream app answers to every request (200, text/plain)."""

# Shared by both configs: one worker, no access log, connections kept alive for the
# whole bench (nginx closes a keep-alive connection after 1,000 requests by default,
# which would add reconnects to every path but the Python proxies').
_MAIN = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{body}
}}
"""


def app_config(prefix: Path, port: int) -> str:
    """The upstream app: 200 with a small body for every request."""
    body = f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{UPSTREAM_BODY.strip()}\\n";
        }}
    }}"""
    return _MAIN.format(prefix=prefix, body=body)


def proxy_config(prefix: Path, port: int, upstream_port: int, keepalive: int = 64) -> str:
    """A reverse proxy to 127.0.0.1:upstream_port with upstream keep-alive."""
    body = f"""\
    upstream app {{
        server 127.0.0.1:{upstream_port};
        keepalive {keepalive};
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering on;
        }}
    }}"""
    return _MAIN.format(prefix=prefix, body=body)


def command(prefix: Path, config: str) -> list[str]:
    """Write the config under prefix and return the command that runs nginx on it."""
    prefix.mkdir(parents=True, exist_ok=True)
    # When the bench runs as root, nginx's worker runs as `nobody` and must read the prefix.
    os.chmod(prefix, 0o755)
    (prefix / "nginx.conf").write_text(config)
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    return [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf")]


def nginx_version() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ").removeprefix("nginx/")


def ensure_installed() -> None:
    """Install nginx and wrk from Debian's packages when either is missing."""
    missing = [name for name in ("nginx", "wrk") if not (shutil.which(name) or Path(f"/usr/sbin/{name}").exists())]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SystemExit(f"{', '.join(missing)} missing and apt-get is not available: install nginx and wrk first")
    packages = ["nginx-light" if name == "nginx" else name for name in missing]
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {' '.join(packages)} from Debian's packages", flush=True)
    if subprocess.run([*sudo, "apt-get", "install", "-y", *packages], env=env, check=False).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update"], env=env, check=True)
        if subprocess.run([*sudo, "apt-get", "install", "-y", *packages], env=env, check=False).returncode != 0:
            fallback = ["nginx" if p == "nginx-light" else p for p in packages]
            subprocess.run([*sudo, "apt-get", "install", "-y", *fallback], env=env, check=True)
