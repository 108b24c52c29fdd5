"""``tpenv connect``: outbound access from this machine to the cluster (docs/connect.md).

One core (:class:`~tpenv.engine.outbound.core.OutboundCore`: the relay session, the proxied
ranges, the local resolver, ``on_connection``) with captures in front of it: ``env`` (a SOCKS5 /
HTTP CONNECT proxy and port maps, here), ``host`` and ``ns`` (``tpenv.kits.capture_*``).

The contract the captures build on (kept stable):

- ``await core.on_connection(dst_ip, dst_port, reader, writer)``: one captured TCP connection;
  cluster destinations go through the relay, the rest is dialled from this machine (its
  sockets carry ``core.mark`` when set, so a capture's rules can skip them), spliced both ways;
  the call returns when both directions are done and both writers are closed;
- ``core.resolver_address``: ``(host, port)`` of tpenv's DNS server (UDP and TCP, 127.0.0.1);
- ``core.cidrs``: the proxied ranges (discovered pod and service ranges + ``also_proxy`` -
  ``never_proxy``); ``core.dns_suffixes``: the cluster's DNS suffixes (routing domains);
  ``core.search_list``: a resolv.conf ``search`` line for a command run "inside" the cluster;
  ``core.cluster_dns``: the cluster DNS addresses (the pods' nameserver).
"""
