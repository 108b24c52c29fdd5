"""What each daemon of the local cluster is: its config files, command line and health check.

Everything lives under <state> = $TPENV_CACHE/cluster (default ~/.cache/tpenv/cluster):
pki/, etc/ (configs and kubeconfigs), containerd/, etcd/, kubelet/, logs/, pids/ and
the admin `kubeconfig`. `Component.fingerprint` hashes the command line and config
files, so a warm `up` restarts exactly the daemons whose settings changed.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import build
import network as net
import pki
from proc import http_ok, run

NODE = "tpenv-node"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
CLUSTER_DOMAIN = "cluster.local"
DNS_IP = net.NODE_IP  # CoreDNS runs on the host, on the bridge address
# ...and is published as kubeadm and kind publish it: Service kube-dns in kube-system, this
# ClusterIP (the tenth of the service range, as kubeadm picks it), which pods get as their
# nameserver (kubelet clusterDNS). Clients discover the cluster DNS through it as on any cluster.
DNS_SERVICE_IP = "10.96.0.10"
API_PORT = 6443
REGISTRIES = ["docker.io", "registry.k8s.io", "k8s.gcr.io", "gcr.io", "ghcr.io", "quay.io", "mcr.microsoft.com",
              "public.ecr.aws", "registry.gitlab.com"]


def state_dir() -> Path:
    return build.cache_root() / "cluster"


def kubeconfig_path() -> Path:
    return state_dir() / "kubeconfig"


def containerd_address() -> Path:
    return state_dir() / "run" / "containerd.sock"


@dataclass
class Component:
    name: str
    cmd: list[str]
    healthy: Callable[[], bool]
    configs: list[Path] = field(default_factory=list)

    def fingerprint(self) -> str:
        h = hashlib.sha256("\0".join(map(str, self.cmd)).encode())
        for p in self.configs:
            h.update(p.read_bytes())
        return h.hexdigest()[:16]


class Layout:
    """Paths, certificates and config files of one local cluster."""

    def __init__(self) -> None:
        self.state = state_dir()
        self.pki = self.state / "pki"
        self.etc = self.state / "etc"
        self.bin = build.k8s_bin_dir()
        self.ca = self.pki / "ca.crt"
        self.admin = (self.pki / "admin.crt", self.pki / "admin.key")

    # ------------------------------------------------------------ PKI and kubeconfigs

    def write_pki(self) -> None:
        d = self.pki
        pki.ensure_ca(d)
        pki.ensure_sa_keys(d)
        pki.ensure_cert(d, "apiserver", "kube-apiserver", server=True, sans=[
            "IP:127.0.0.1", f"IP:{net.API_SERVICE_IP}", f"IP:{net.NODE_IP}", "DNS:localhost", f"DNS:{NODE}",
            "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
            f"DNS:kubernetes.default.svc.{CLUSTER_DOMAIN}"])
        pki.ensure_cert(d, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters", client=True)
        pki.ensure_cert(d, "front-proxy-client", "front-proxy-client", client=True)
        pki.ensure_cert(d, "kubelet", f"system:node:{NODE}", "system:nodes", server=True, client=True,
                        sans=[f"IP:{net.NODE_IP}", "IP:127.0.0.1", f"DNS:{NODE}"])
        users = {
            "admin": ("tpenv-admin", "system:masters"),
            "controller-manager": ("system:kube-controller-manager", None),
            "scheduler": ("system:kube-scheduler", None),
            "kube-proxy": ("system:kube-proxy", None),
            "coredns": ("tpenv:coredns", None),
        }
        server = f"https://127.0.0.1:{API_PORT}"
        for name, (cn, org) in users.items():
            crt, key = pki.ensure_cert(d, name, cn, org, client=True)
            pki.write_kubeconfig(self.etc / f"{name}.kubeconfig", server, self.ca, crt, key, cn)
        pki.write_kubeconfig(self.etc / "kubelet.kubeconfig", server, self.ca, d / "kubelet.crt", d / "kubelet.key",
                             f"system:node:{NODE}")
        # The user's kubeconfig: the admin one, at a stable path.
        pki.write_kubeconfig(kubeconfig_path(), server, self.ca, *self.admin, "tpenv-admin")

    # ------------------------------------------------------------ config files

    def _write(self, name: str, text: str) -> Path:
        p = self.etc / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
        return p

    def _json(self, name: str, obj: dict) -> Path:
        return self._write(name, json.dumps(obj, indent=2) + "\n")

    def containerd_config(self) -> Path:
        text = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True, check=True).stdout
        root, st = self.state / "containerd" / "root", self.state / "containerd" / "state"
        subs = [
            ('root = "/var/lib/containerd"', f'root = "{root}"'),
            ('state = "/run/containerd"', f'state = "{st}"'),
            ('address = "/run/containerd/containerd.sock"', f'address = "{containerd_address()}"'),
            ('sandbox_image = "registry.k8s.io/pause:3.6"', f'sandbox_image = "{PAUSE_IMAGE}"'),
            ('bin_dir = "/opt/cni/bin"', 'bin_dir = "/usr/lib/cni"'),
            ('conf_dir = "/etc/cni/net.d"', f'conf_dir = "{self.etc / "cni"}"'),
            # This VM's root lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below containerd's own
            # (the pause container asks for -998 and fails with "can't get final child's PID from pipe").
            ("restrict_oom_score_adj = false", "restrict_oom_score_adj = true"),
            # Registry hosts we know are rewritten to a closed local port (see registry_hosts()).
            ('config_path = ""', f'config_path = "{self.registry_hosts()}"'),
        ]
        for old, new in subs:
            if old not in text:
                raise RuntimeError(f"`containerd config default` has no line {old!r}: containerd changed, "
                                   f"update tests/cluster/components.py")
            text = text.replace(old, new, 1)
        if "SystemdCgroup = false" not in text:
            raise RuntimeError("containerd's default config does not say SystemdCgroup = false")
        return self._write("containerd.toml", text)

    def registry_hosts(self) -> Path:
        """hosts.toml per well-known registry, pointing at 127.0.0.1:1 (nothing listens there).

        Images are built here and pods use imagePullPolicy: Never, so nothing should ever be
        pulled; this makes sure a stray pull (a manifest with IfNotPresent, a missing pause
        image) fails at once on this machine instead of reaching for the internet.
        """
        root = self.etc / "certs.d"
        for host in REGISTRIES:
            # containerd 1.6 rejects a hosts.toml without a [host] table (and then falls back to
            # the real registry), so the closed port is named twice.
            self._write(f"certs.d/{host}/hosts.toml",
                        f"# tpenv: images are built locally, never pulled from {host}\n"
                        'server = "http://127.0.0.1:1"\n\n'
                        '[host."http://127.0.0.1:1"]\n  capabilities = ["pull", "resolve"]\n')
        return root

    def cni_config(self) -> Path:
        conf = {
            "cniVersion": "1.0.0", "name": "tpenv",
            "plugins": [
                {"type": "bridge", "bridge": net.BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": net.POD_SUBNET, "gateway": net.NODE_IP}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.state / "cni" / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        return self._json("cni/10-tpenv.conflist", conf)

    def kubelet_config(self) -> Path:
        sock = f"unix://{containerd_address()}"
        return self._json("kubelet.json", {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": net.NODE_IP, "port": 10250, "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.ca)}},
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(self.pki / "kubelet.crt"), "tlsPrivateKeyFile": str(self.pki / "kubelet.key"),
            "containerRuntimeEndpoint": sock, "imageServiceEndpoint": sock,
            # No systemd here, and this VM runs cgroup v1 (kubelet >= 1.35 refuses it by default).
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "clusterDNS": [DNS_SERVICE_IP], "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(self._write("resolv.conf", f"nameserver {DNS_IP}\n")),
            # Locally built images cannot be pulled back: never garbage-collect or evict them.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "podLogsDir": str(self.state / "pod-logs"),
            "serializeImagePulls": False, "maxPods": 110,
        })

    def kube_proxy_config(self) -> Path:
        return self._json("kube-proxy.json", {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.etc / "kube-proxy.kubeconfig")},
            "mode": "iptables", "clusterCIDR": net.POD_CIDR, "hostnameOverride": NODE,
            "bindAddress": "127.0.0.1", "nodePortAddresses": ["primary"],
            "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
            # Leave the host's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        })

    def corefile(self) -> Path:
        # Only the cluster's zones; no `forward`: any other name is refused, never sent upstream.
        zones = f"{CLUSTER_DOMAIN} in-addr.arpa ip6.arpa"
        text = (
            f"{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{\n"
            f"    bind {DNS_IP}\n"
            "    errors\n"
            "    health 127.0.0.1:18080\n"
            "    ready 127.0.0.1:18181\n"
            f"    kubernetes {zones} {{\n"
            f"        kubeconfig {self.etc / 'coredns.kubeconfig'} tpenv\n"
            "        pods insecure\n"
            "        fallthrough in-addr.arpa ip6.arpa\n"
            "        ttl 5\n"
            "    }\n"
            "    cache 5\n"
            "    loadbalance\n"
            "}\n"
        )
        return self._write("Corefile", text)

    # ------------------------------------------------------------ the daemons, in start order

    def components(self) -> list[Component]:
        b, p, e, s = self.bin, self.pki, self.etc, self.state
        admin_cert = self.admin

        def https(port: int, path: str, cert: bool = False) -> Callable[[], bool]:
            return lambda: http_ok(f"https://127.0.0.1:{port}{path}", ca=self.ca if cert else None,
                                   cert=admin_cert if cert else None)

        def ctr_ok() -> bool:
            return run(["ctr", "--address", containerd_address(), "version"], check=False,
                       quiet=True, timeout=5).returncode == 0

        kc = lambda n: str(e / f"{n}.kubeconfig")  # noqa: E731
        return [
            Component("containerd", ["containerd", "--config", self.containerd_config()], ctr_ok,
                      [self.containerd_config(), self.cni_config()]),
            Component("etcd", [build.etcd_bin(), "--name", "tpenv", "--data-dir", s / "etcd",
                               "--listen-client-urls", "http://127.0.0.1:2379",
                               "--advertise-client-urls", "http://127.0.0.1:2379",
                               "--listen-peer-urls", "http://127.0.0.1:2380",
                               "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                               "--initial-cluster", "tpenv=http://127.0.0.1:2380",
                               "--listen-metrics-urls", "http://127.0.0.1:2381",
                               "--log-level", "warn"],
                      lambda: http_ok("http://127.0.0.1:2381/health")),
            Component("kube-apiserver", [
                b / "kube-apiserver",
                "--etcd-servers=http://127.0.0.1:2379",
                f"--advertise-address={net.NODE_IP}", f"--secure-port={API_PORT}",
                f"--service-cluster-ip-range={net.SERVICE_CIDR}",
                f"--client-ca-file={self.ca}",
                f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={self.ca}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                "--authorization-mode=Node,RBAC", "--anonymous-auth=false",
                "--enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
                # The host cannot reach ClusterIPs (unreachable route): webhooks and aggregated APIs are
                # dialled at their endpoints' pod IPs instead.
                "--enable-aggregator-routing=true",
                "--allow-privileged=true", "--profiling=false",
                # The aggregation layer's front proxy (otherwise every component logs a missing CA bundle).
                f"--requestheader-client-ca-file={self.ca}", "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={p / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={p / 'front-proxy-client.key'}",
            ], https(API_PORT, "/readyz", cert=True)),
            Component("kube-controller-manager", [
                b / "kube-controller-manager",
                f"--kubeconfig={kc('controller-manager')}",
                f"--authentication-kubeconfig={kc('controller-manager')}",
                f"--authorization-kubeconfig={kc('controller-manager')}",
                "--bind-address=127.0.0.1", "--leader-elect=false",
                f"--cluster-signing-cert-file={self.ca}", f"--cluster-signing-key-file={p / 'ca.key'}",
                f"--root-ca-file={self.ca}", f"--service-account-private-key-file={p / 'sa.key'}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={net.SERVICE_CIDR}", f"--cluster-cidr={net.POD_CIDR}",
                "--allocate-node-cidrs=false", "--profiling=false",
            ], https(10257, "/healthz")),
            Component("kube-scheduler", [
                b / "kube-scheduler",
                f"--kubeconfig={kc('scheduler')}",
                f"--authentication-kubeconfig={kc('scheduler')}",
                f"--authorization-kubeconfig={kc('scheduler')}",
                "--bind-address=127.0.0.1", "--leader-elect=false", "--profiling=false",
            ], https(10259, "/healthz")),
            Component("kubelet", [
                b / "kubelet", f"--config={self.kubelet_config()}", f"--kubeconfig={kc('kubelet')}",
                f"--root-dir={s / 'kubelet'}", f"--hostname-override={NODE}", f"--node-ip={net.NODE_IP}",
            ], lambda: http_ok("http://127.0.0.1:10248/healthz"), [self.kubelet_config()]),
            Component("kube-proxy", [b / "kube-proxy", f"--config={self.kube_proxy_config()}"],
                      lambda: http_ok("http://127.0.0.1:10256/livez"), [self.kube_proxy_config()]),
            Component("coredns", [build.coredns_bin(), "-conf", self.corefile()],
                      lambda: http_ok("http://127.0.0.1:18181/ready"), [self.corefile()]),
        ]


# The kube-dns Service: no selector (CoreDNS is a host process, not a pod), so its EndpointSlice
# is written here, pointing at the bridge address CoreDNS binds; kube-proxy does the rest.
KUBE_DNS = {
    "apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system",
                      "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
         "spec": {"clusterIP": DNS_SERVICE_IP, "ports": [
             {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
             {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                      "labels": {"kubernetes.io/service-name": "kube-dns",
                                 "endpointslice.kubernetes.io/managed-by": "tpenv-cluster"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [DNS_IP], "conditions": {"ready": True}, "nodeName": NODE}],
         "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]},
    ],
}

# RBAC for CoreDNS's user (kubeadm ships the same as system:coredns).
COREDNS_RBAC = {
    "apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "tpenv:coredns"},
         "rules": [
             {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "tpenv:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tpenv:coredns"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "tpenv:coredns"}]},
    ],
}
