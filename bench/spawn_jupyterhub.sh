# Sourced by bench/spawn.sh: starts JupyterHub 6.1.1 with DockerSpawner 14.0.0
# (from PyPI, bench_venv) as the seed deployment configures it: DockerSpawner
# on its own Docker network, reached by the container's address on it, the
# seed's three named volumes per user, containers removed on stop,
# NativeAuthenticator, SQLite. The image is $image, the same as berth's.
# Differences, all outside what is measured: the hub runs on the host (not in
# a container) and binds loopback; its proxy is a no-op class
# (configurable-http-proxy is an npm package this machine does not have; no
# request is routed through either hub's proxy here); the start and HTTP
# timeouts are raised to berth's (300 s) so a slow start is measured, not
# cut off. Sets JH (the pid), JH_URL and token (a service's API token with
# admin:users and admin:servers).
bench_venv
jh_work=$work/jupyterhub
mkdir -p "$jh_work"
JH_PORT=$(free_port)
token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
docker network create "jh-bench-$$" >/dev/null
{ jh_noproxy_config; cat <<PY
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = $JH_PORT
c.JupyterHub.db_url = "sqlite:///$jh_work/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "$jh_work/cookie_secret"
c.JupyterHub.pid_file = "$jh_work/jupyterhub.pid"
c.JupyterHub.authenticator_class = "native"
c.Authenticator.admin_users = {"admin"}
c.Authenticator.allow_all = True
c.JupyterHub.services = [{"name": "bench", "api_token": "$token"}]
c.JupyterHub.load_roles = [{"name": "bench", "scopes": ["admin:users", "admin:servers"], "services": ["bench"]}]

c.JupyterHub.spawner_class = "dockerspawner.DockerSpawner"
c.DockerSpawner.image = "$image"
c.DockerSpawner.network_name = "jh-bench-$$"
c.DockerSpawner.use_internal_ip = True
c.DockerSpawner.name_template = "jupyterlab-{username}"
c.DockerSpawner.notebook_dir = "/home/lab/workspace"
c.DockerSpawner.volumes = {
    "jupyterlab-{username}_home": "/home",
    "jupyterlab-{username}_workspace": "/home/lab/workspace",
    "jupyterlab-{username}_cache": "/home/lab/.cache",
}
c.DockerSpawner.remove = True
c.Spawner.start_timeout = 300
c.Spawner.http_timeout = 300
PY
} > "$jh_work/jupyterhub_config.py"
start_jupyterhub "$jh_work"
