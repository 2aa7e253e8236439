"""The Prefect tasks of this package, all wrapped here: the plain functions stay callable without
Prefect (tests, other tasks), and the renew-certificates flow calls the wrapped ones. The task names
are the ones the UI and the flow's runs show."""

from __future__ import annotations

from tasks.certificates.certbot import certbot_dry_run, renew_lineage
from tasks.certificates.inventory import take_inventory
from tasks.certificates.proof import verify_endpoints
from tasks.certificates.reload import reload_server
from tasks.ops_task import ops_task

take_inventory_task = ops_task(take_inventory, name="inventory-certificates")
certbot_dry_run_task = ops_task(certbot_dry_run, name="certbot-dry-run", task_run_name="dry-run-{cert_name}")
renew_lineage_task = ops_task(renew_lineage, name="certbot-renew", task_run_name="renew-{cert_name}")
reload_server_task = ops_task(reload_server, name="reload-tls-server")
verify_endpoints_task = ops_task(verify_endpoints, name="verify-served-certificates")
