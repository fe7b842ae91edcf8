"""Provision the dashboards into a Grafana server through its HTTP API, with a Prometheus data source.

    python -m gpt2serve.dashboards.provision --url http://grafana:3000 --api-key $GRAFANA_TOKEN \\
        --prometheus-url http://prometheus:9090
    python -m gpt2serve.dashboards.provision --url http://admin:admin@localhost:3000 --prometheus-url http://localhost:9090

Creates (or updates) the data source ``gpt2serve-prometheus`` and the folder ``gpt2serve``, uploads every
dashboard of ``dashboards/json/`` into it (overwriting the previous version), selects the data source in each
dashboard's ``$datasource`` variable, and reads every dashboard back to check that Grafana stored what was sent.

The client is ``grafana-client`` (maintained, https://github.com/grafana-toolbox/grafana-client). The
``grafana-api`` package the issue names has had no release since 1.0.3 in August 2020 (grafana-client is the
community fork that carried it on), so it is not used.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError

JSON_DIR = Path(__file__).resolve().parent / "json"
DATASOURCE_UID = "gpt2serve-prometheus"
FOLDER_UID = "gpt2serve"


def load_dashboards(directory: Path = JSON_DIR) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def ensure_datasource(api: GrafanaApi, name: str, prometheus_url: str, scrape_interval: str) -> dict:
    body = {"name": name, "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy", "url": prometheus_url,
            "isDefault": False, "jsonData": {"httpMethod": "POST", "timeInterval": scrape_interval}}
    try:
        existing = api.datasource.get_datasource_by_uid(DATASOURCE_UID)
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
        api.datasource.create_datasource(body)
    else:
        api.datasource.update_datasource_by_uid(DATASOURCE_UID, {**existing, **body})
    return api.datasource.get_datasource_by_uid(DATASOURCE_UID)


def ensure_folder(api: GrafanaApi, title: str) -> str:
    try:
        return api.folder.get_folder(FOLDER_UID)["uid"]
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
    return api.folder.create_folder(title, uid=FOLDER_UID)["uid"]


def with_datasource(dashboard: dict, datasource: dict) -> dict:
    """The dashboard with its ``$datasource`` variable pointing at ``datasource``."""
    out = copy.deepcopy(dashboard)
    out.pop("id", None)
    for var in out.get("templating", {}).get("list", []):
        if var.get("type") == "datasource":
            var["current"] = {"selected": True, "text": datasource["name"], "value": datasource["uid"]}
    return out


def queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard.get("panels", []) for t in p.get("targets", []) if "expr" in t]


def provision(api: GrafanaApi, prometheus_url: str, datasource_name: str = "gpt2serve-prometheus",
              folder: str = "gpt2serve", scrape_interval: str = "5s",
              dashboards: dict[str, dict] | None = None) -> dict[str, str]:
    """Returns dashboard uid -> its URL path in Grafana. Raises if a dashboard reads back different."""
    datasource = ensure_datasource(api, datasource_name, prometheus_url, scrape_interval)
    folder_uid = ensure_folder(api, folder)
    urls = {}
    for name, dashboard in (dashboards or load_dashboards()).items():
        sent = with_datasource(dashboard, datasource)
        reply = api.dashboard.update_dashboard({"dashboard": sent, "folderUid": folder_uid, "overwrite": True,
                                                "message": "python -m gpt2serve.dashboards.provision"})
        stored = api.dashboard.get_dashboard(sent["uid"])
        got = stored["dashboard"]
        if got.get("title") != sent["title"] or queries(got) != queries(sent):
            raise RuntimeError(f"dashboard {name} ({sent['uid']}) did not read back as sent")
        if stored.get("meta", {}).get("folderUid", folder_uid) != folder_uid:
            raise RuntimeError(f"dashboard {name} is not in folder {folder_uid}")
        urls[sent["uid"]] = reply.get("url", f"/d/{sent['uid']}")
    return urls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="Grafana base URL (credentials may be inside: http://u:p@host)")
    ap.add_argument("--api-key", default=None, help="service-account token (or use --user/--password)")
    ap.add_argument("--user", default=None)
    ap.add_argument("--password", default=None)
    ap.add_argument("--prometheus-url", default="http://localhost:9090",
                    help="Prometheus as Grafana's server reaches it")
    ap.add_argument("--datasource-name", default="gpt2serve-prometheus")
    ap.add_argument("--folder", default="gpt2serve")
    ap.add_argument("--scrape-interval", default="5s", help="Prometheus' scrape interval (Grafana's minimum step)")
    ap.add_argument("--dir", type=Path, default=JSON_DIR, help="directory of dashboard JSON files")
    args = ap.parse_args(argv)
    credential: Any = args.api_key or ((args.user, args.password) if args.user else None)
    api = GrafanaApi.from_url(args.url, credential=credential)
    urls = provision(api, args.prometheus_url, args.datasource_name, args.folder, args.scrape_interval,
                     load_dashboards(args.dir))
    for uid, path in urls.items():
        print(f"{uid}: {args.url.rstrip('/')}{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
