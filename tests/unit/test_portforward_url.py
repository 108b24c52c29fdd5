"""portforward_url: the API path and scheme the transport asks for (pure logic)."""
from tpenv.kits.portforward import SUBPROTOCOL, portforward_url


def test_https_server_becomes_wss_with_ports_query():
    assert portforward_url("https://10.0.0.1:6443/", "team", "hello-1", 7922) == \
        "wss://10.0.0.1:6443/api/v1/namespaces/team/pods/hello-1/portforward?ports=7922"


def test_http_server_and_path_prefix_are_kept():
    assert portforward_url("http://127.0.0.1:8001/k8s", "ns", "p", 80) == \
        "ws://127.0.0.1:8001/k8s/api/v1/namespaces/ns/pods/p/portforward?ports=80"


def test_subprotocol_is_the_kubelets_binary_channel_protocol():
    assert SUBPROTOCOL == "v4.channel.k8s.io"
