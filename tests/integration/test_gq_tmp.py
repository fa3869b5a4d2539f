import time, signal
from test_gossip import Node, wait_for, has_peers, chain

def test_kill9(daemon_factory):
    for attempt in range(6):
        a, b, c = chain(daemon_factory, f"127.0.{attempt+80}.")
        wait_for(lambda: (c.did in b.nodes() and a.did in b.nodes(), None), "know", [a,b,c])
        if not (b.did > c.did):   # new conn B->C loses only when B's key > C's key (memcmp on raw pk ~ did order roughly)
            pass
        b.d.kill(); t0=time.time()
        b.start()
        ok = False
        for i in range(400):
            if c.did in b.peer_dids(): ok=True; break
            time.sleep(0.1)
        print("\nattempt", attempt, "ok" if ok else "STUCK", time.time()-t0)
        if not ok or time.time()-t0 > 2:
            print("=== C log"); print("\n".join(l for l in c.d.stderr().splitlines() if "control: pid" not in l)[-6000:])
            print("=== B log"); print("\n".join(l for l in b.d.stderr().splitlines() if "control: pid" not in l)[-3000:])
            return
