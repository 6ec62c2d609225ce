"""`strategy-host deploy`: options, the dry run, writing, and the explanation printed with it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import deploy
from .deploy import DeployError, DeployOptions


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `strategy-host deploy`."""
    p = sub.add_parser("deploy", help="write the systemd unit, the settings and an HTTPS proxy config for a server",
                       description="Writes a systemd unit, /etc/strategy-host/host.env (with new secrets) and a "
                                   "Caddy or nginx config that serves the host over HTTPS, then prints the commands "
                                   "that start them. Run it with sudo on a Debian/Ubuntu server; --dry-run prints "
                                   "everything and writes nothing.")
    p.add_argument("--domain", required=True, help="the server's DNS name, e.g. trade.example.com (its A record must "
                                                   "point at this server for a real certificate)")
    p.add_argument("--proxy", choices=("nginx", "caddy"), default="nginx",
                   help="nginx (default: rate limits built in; certificate from certbot) or caddy (automatic HTTPS)")
    p.add_argument("--user", default="strategy-host", help="the system user the host runs as (default strategy-host)")
    p.add_argument("--data-dir", default="/var/lib/strategy-host",
                   help="DATA_DIR, under /var/lib (default /var/lib/strategy-host)")
    p.add_argument("--exec", dest="exec_path", default=deploy.default_exec_path(),
                   help="the strategy-host program the service runs (default: the one next to this Python, %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="the host's own port on 127.0.0.1 (default 8000)")
    p.add_argument("--tradingview-only", action="store_true",
                   help="only TradingView's sender addresses (" + ", ".join(deploy.TRADINGVIEW_IPS)
                        + ") may call /webhook, at the proxy and in the host (WEBHOOK_ALLOWED_IPS)")
    p.add_argument("--webhook-ip", action="append", default=[], metavar="IP",
                   help="another address or network allowed to call /webhook (repeatable; implies an allowlist)")
    p.add_argument("--tls-internal", action="store_true",
                   help="caddy: a certificate from Caddy's own CA, for a test server without a public DNS name")
    p.add_argument("--cert", default="", help="nginx: certificate chain PEM (default: certbot's for --domain)")
    p.add_argument("--key", default="", help="nginx: private key PEM (default: certbot's for --domain)")
    p.add_argument("--listen", default="", metavar="ADDRESS", help="the address the proxy listens on (default: all)")
    p.add_argument("--http-port", type=int, default=80, help="the proxy's HTTP port (default 80; it only redirects)")
    p.add_argument("--https-port", type=int, default=443,
                   help="the proxy's HTTPS port (default 443; TradingView sends only to 80 and 443)")
    p.add_argument("--out", default="/", metavar="DIR",
                   help="write under this folder instead of / (e.g. to review the files first)")
    p.add_argument("--force", action="store_true",
                   help="replace a unit or proxy config that differs (a .bak copy is kept; host.env is never replaced)")
    p.add_argument("--dry-run", action="store_true", help="print every file and the steps; write nothing")
    p.set_defaults(func=cmd_deploy)


def options(args: argparse.Namespace) -> DeployOptions:
    """The checked options from the command line."""
    return deploy.check(DeployOptions(
        domain=args.domain, proxy=args.proxy, user=args.user, data_dir=args.data_dir, exec_path=args.exec_path,
        port=args.port, tradingview_only=args.tradingview_only, webhook_ips=tuple(args.webhook_ip),
        tls_internal=args.tls_internal, cert=args.cert, key=args.key, listen_address=args.listen,
        http_port=args.http_port, https_port=args.https_port,
        caddy_request_buffers=args.proxy == "caddy" and deploy.caddy_has_request_buffers()))


def cmd_deploy(args: argparse.Namespace) -> int:
    try:
        opts = options(args)
        problem = deploy.exec_problem(opts.exec_path)
        if problem:
            raise DeployError(problem)
        plan = deploy.plan(opts, None if args.dry_run else deploy.new_secrets(), deploy.default_plugins_source())
    except DeployError as e:
        print(f"strategy-host deploy: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for f in plan.files:
            print(f"==> {f.path} (mode {f.mode:04o}) <==\n# {f.about}\n{f.text}")
        _explain(plan, opts, "would write (dry run: nothing was written)")
        return 0
    try:
        done = deploy.write(plan, Path(args.out), args.force)
    except DeployError as e:
        print(f"strategy-host deploy: nothing written: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"strategy-host deploy: cannot write {e.filename}: {e.strerror} (run it with sudo, or give --out DIR)",
              file=sys.stderr)
        return 1
    for w in done:
        note = " (it holds your secrets: edit it, deploy never replaces it)" if w.outcome == "kept" else ""
        print(f"{w.outcome:>9}  {w.path}{note}")
        if w.note:
            print(f"  warning: {w.path} keeps other settings than these options: {w.note}; edit it to match")
    _explain(plan, opts, "wrote")
    return 0


def _explain(plan: deploy.Plan, opts: DeployOptions, verb: str) -> None:
    print(f"\nstrategy-host deploy {verb}:")
    for f in plan.files:
        print(f"  {f.path}: {f.about}")
    if opts.proxy == "caddy":
        seen = deploy.caddy_version()[1]
        print(f"  note: {deploy.CADDY_SPELLINGS}; this one has "
              f"`{'request_buffers unlimited' if opts.caddy_request_buffers else 'buffer_requests'}` ({seen}); "
              f"`caddy validate` in the steps below says if the Caddy you end up with disagrees")
        print("  note: Debian's caddy has no per-address rate limiter; the host's login lockout still applies "
              "(use --proxy nginx for rate limits at the front)")
    print("\nThen, on the server:")
    for i, step in enumerate(plan.steps, 1):
        print(f"  {i}. {step}")
