/* journald MESSAGE_ID= values of megaengine's key events, one place for all of them. Each is a
 * ready-made "MESSAGE_ID=<128-bit id>" field for me_log_fields(); ids never change once
 * released, so administrators can filter on them: journalctl MESSAGE_ID=<id>. New ids: run
 * `systemd-id128 new` (or any random 128-bit hex). docs/systemd.md lists them. */
#ifndef ME_MSGIDS_H
#define ME_MSGIDS_H

#define ME_MSGID_STARTED "MESSAGE_ID=be2690f22e5b42acb5df7dbbed6fdba6"
#define ME_MSGID_STOPPED "MESSAGE_ID=56f46667f1be437fb8c8a1bdeccbe78e"
#define ME_MSGID_RELOADED "MESSAGE_ID=4acb029fbb6f43a2b4c470a001f3b393"
#define ME_MSGID_RELOAD_FAILED "MESSAGE_ID=ab701d80016c4b17bb87d37d512b9fe7"
#define ME_MSGID_PEER_CONNECTED "MESSAGE_ID=e5da10c9671940bda0d261a405f8d9bd"
#define ME_MSGID_PEER_LOST "MESSAGE_ID=1d8e1afa224b4a2a8d54864da291aaa6"
#define ME_MSGID_REPO_ADDED "MESSAGE_ID=d6c8b4e10a644d8cbccd717169b1ea40"
#define ME_MSGID_REPO_REMOVED "MESSAGE_ID=d2611504aa784c13b8b4e0383f5296f9"
#define ME_MSGID_REPO_ANNOUNCED "MESSAGE_ID=f0e8868a48e04c7294de204fb6f083d4"
#define ME_MSGID_ANN_REJECTED "MESSAGE_ID=3c1b6c3f0a4e4d2b9e6f7a8b9c0d1e2f"
/* Replication (not yet implemented): a sync finished / a fetched ref state was refused. */
#define ME_MSGID_SYNC_DONE "MESSAGE_ID=31e905f7940c4942be950f567ca71b42"
#define ME_MSGID_SYNC_REJECTED "MESSAGE_ID=cdf3885474514d5caa70d16aa67319ab"

#endif
