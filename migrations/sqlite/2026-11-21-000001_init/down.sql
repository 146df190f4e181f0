DROP TABLE ws_settings;
DROP TABLE instances;
DROP TABLE accounts;
